//! Byte layouts on the wire: the handshake of a data connection (the
//! connector's hello, the listener's answers, the connector's proof) and the
//! fixed 32-byte header in front of every message of a collective. Encoding
//! and decoding only; no sockets.
//!
//! The handshake (version 3), after which the connection carries frames:
//!
//! ```text
//! connector -> listener  hello:  "FLCM" | version u16 | job length u16 | job |
//!                                generation u64 | from u32 | to u32 | world u32 |
//!                                lane u32 | connector nonce [32]
//! listener -> connector  answer: 3 | listener nonce [32] | listener proof [32]
//!                            or  2 | newest generation u64        (stale: end)
//! connector -> listener  proof [32]
//! listener -> connector  answer: 1                                (accepted)
//!                            or  2 | newest generation u64        (stale: end)
//! ```
//!
//! Integers are little-endian. Proofs are HMAC-SHA256 under the generation's
//! secret (see `auth.rs`); a listener closes a connection whose hello does
//! not parse or whose proof does not hold, without an answer.

use std::fmt;

use crate::auth::{Nonce, Proof, NONCE_LEN, PROOF_LEN};

/// First bytes of every handshake.
pub(crate) const MAGIC: [u8; 4] = *b"FLCM";
/// Version of everything in this file; a peer with another one is refused.
pub(crate) const VERSION: u16 = 3;
/// Longest job id accepted in a handshake.
pub(crate) const MAX_JOB_LEN: usize = 1024;
/// Marks a frame header, so that stray bytes are caught at once.
const FRAME_MARK: [u8; 2] = [0xF1, 0x07];
pub(crate) const FRAME_LEN: usize = 32;
/// Bytes of a hello before the job id: magic, version and the job's length.
pub(crate) const HELLO_PREFIX: usize = 8;
/// Bytes of a hello after the job id: generation, three u32, the lane and
/// the connector's nonce.
const HELLO_TAIL: usize = 24 + NONCE_LEN;

/// What a connecting rank says first: who it is and which ring it wants to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub job: String,
    pub generation: u64,
    pub from_rank: u32,
    /// The rank the connector believes it is talking to; checked when claimed.
    pub to_rank: u32,
    pub world: u32,
    /// Which kind of connection this is, so that the ring link and the direct
    /// links between the same two ranks are told apart.
    pub lane: Lane,
}

/// The kinds of connection between two ranks of one ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Lane {
    /// From a rank to the next one around the ring.
    Ring = 1,
    /// Between any two ranks, for the latency-optimal collectives; dialed by
    /// the lower rank, used in both directions.
    Direct = 2,
    /// Between any two ranks, for `send`/`recv`; dialed by the lower rank.
    PointToPoint = 3,
}

impl Lane {
    fn from_code(code: u32) -> Option<Lane> {
        Some(match code {
            1 => Lane::Ring,
            2 => Lane::Direct,
            3 => Lane::PointToPoint,
            _ => return None,
        })
    }
}

impl Hello {
    /// The hello's bytes with the connector's `nonce`; they are also what
    /// both ends' proofs cover.
    pub fn encode(&self, nonce: &Nonce) -> Vec<u8> {
        let job = self.job.as_bytes();
        let mut out = Vec::with_capacity(HELLO_PREFIX + job.len() + HELLO_TAIL);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(job.len() as u16).to_le_bytes());
        out.extend_from_slice(job);
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.from_rank.to_le_bytes());
        out.extend_from_slice(&self.to_rank.to_le_bytes());
        out.extend_from_slice(&self.world.to_le_bytes());
        out.extend_from_slice(&(self.lane as u32).to_le_bytes());
        out.extend_from_slice(nonce);
        out
    }

    /// Parses the fixed prefix (magic, version, job length) and returns
    /// how many bytes follow it.
    pub fn rest_len(prefix: &[u8; HELLO_PREFIX]) -> Result<usize, String> {
        if prefix[..4] != MAGIC {
            return Err("not a flotilla comm handshake".into());
        }
        let version = u16::from_le_bytes([prefix[4], prefix[5]]);
        if version != VERSION {
            return Err(format!("protocol version {version}, expected {VERSION}"));
        }
        let job_len = u16::from_le_bytes([prefix[6], prefix[7]]) as usize;
        if job_len > MAX_JOB_LEN {
            return Err(format!("job id of {job_len} bytes is too long"));
        }
        Ok(job_len + HELLO_TAIL)
    }

    /// Parses what follows the prefix (`rest_len` bytes).
    pub fn decode_rest(rest: &[u8]) -> Result<Hello, String> {
        let job_len = rest.len().checked_sub(HELLO_TAIL).ok_or("handshake too short")?;
        let job = std::str::from_utf8(&rest[..job_len]).map_err(|_| "job id is not utf-8".to_string())?.to_string();
        let tail = &rest[job_len..];
        let u32_at = |i: usize| u32::from_le_bytes(tail[i..i + 4].try_into().unwrap());
        Ok(Hello {
            job,
            generation: u64::from_le_bytes(tail[..8].try_into().unwrap()),
            from_rank: u32_at(8),
            to_rank: u32_at(12),
            world: u32_at(16),
            lane: Lane::from_code(u32_at(20)).ok_or_else(|| format!("unknown connection lane {}", u32_at(20)))?,
        })
    }
}

/// What a listener says during a handshake: a status byte and what that
/// status carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The proof held: the connection is parked for its ring.
    Accepted,
    /// The generation is older than one already claimed for the job.
    Stale { newest: u64 },
    /// The listener's nonce, and its own proof of the generation's secret.
    Challenge { nonce: Nonce, proof: Proof },
}

const ACCEPTED: u8 = 1;
const STALE: u8 = 2;
const CHALLENGE: u8 = 3;

impl Answer {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Answer::Accepted => vec![ACCEPTED],
            Answer::Stale { newest } => [&[STALE][..], &newest.to_le_bytes()].concat(),
            Answer::Challenge { nonce, proof } => [&[CHALLENGE][..], nonce, proof].concat(),
        }
    }

    /// How many bytes follow the status byte `status`.
    pub fn rest_len(status: u8) -> Result<usize, String> {
        match status {
            ACCEPTED => Ok(0),
            STALE => Ok(8),
            CHALLENGE => Ok(NONCE_LEN + PROOF_LEN),
            other => Err(format!("unknown handshake answer {other}")),
        }
    }

    /// Parses an answer from its status byte and the `rest_len` bytes after it.
    pub fn decode(status: u8, rest: &[u8]) -> Result<Answer, String> {
        if rest.len() != Answer::rest_len(status)? {
            return Err(format!("handshake answer {status} of {} bytes", rest.len()));
        }
        Ok(match status {
            ACCEPTED => Answer::Accepted,
            STALE => Answer::Stale { newest: u64::from_le_bytes(rest.try_into().unwrap()) },
            _ => Answer::Challenge {
                nonce: rest[..NONCE_LEN].try_into().unwrap(),
                proof: rest[NONCE_LEN..].try_into().unwrap(),
            },
        })
    }
}

/// Which collective a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    AllReduce = 1,
    AllGather = 2,
    Broadcast = 3,
    Barrier = 4,
    ReduceScatter = 5,
    AllGatherF32 = 6,
    PointToPoint = 7,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather_bytes",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllGatherF32 => "all_gather",
            Op::PointToPoint => "send/recv",
        }
    }

    fn from_code(code: u8) -> Option<Op> {
        Some(match code {
            1 => Op::AllReduce,
            2 => Op::AllGather,
            3 => Op::Broadcast,
            4 => Op::Barrier,
            5 => Op::ReduceScatter,
            6 => Op::AllGatherF32,
            7 => Op::PointToPoint,
            _ => return None,
        })
    }
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Part of a collective: `len` payload bytes follow.
    Data = 1,
    /// "I passed my deadline waiting for rank `aux`": the receiver should wait
    /// a little longer for the verdict instead of blaming the sender.
    Stuck = 2,
    /// The op failed because of rank `aux`; `total` is a [`Blame`] code and the
    /// `len` payload bytes are the error message.
    Abort = 3,
}

/// The kind of error an `Abort` frame forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blame {
    Timeout = 1,
    Closed = 2,
    Protocol = 3,
    Io = 4,
}

impl Blame {
    pub fn from_code(code: u64) -> Option<Blame> {
        Some(match code {
            1 => Blame::Timeout,
            2 => Blame::Closed,
            3 => Blame::Protocol,
            4 => Blame::Io,
            _ => return None,
        })
    }
}

/// The header in front of every message on a ring connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    pub kind: Kind,
    pub op: Op,
    /// Data: step or origin rank or root (per op); Stuck/Abort: a rank.
    pub aux: u32,
    /// Sequence number of the collective on this ring.
    pub seq: u64,
    /// Data: total elements (or bytes) of the whole op; Abort: blame code.
    pub total: u64,
    /// Payload bytes after the header.
    pub len: u64,
}

impl Frame {
    pub fn encode(&self) -> [u8; FRAME_LEN] {
        let mut out = [0u8; FRAME_LEN];
        out[0] = self.kind as u8;
        out[1] = self.op as u8;
        out[2..4].copy_from_slice(&FRAME_MARK);
        out[4..8].copy_from_slice(&self.aux.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.total.to_le_bytes());
        out[24..32].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; FRAME_LEN]) -> Result<Frame, String> {
        if bytes[2..4] != FRAME_MARK {
            return Err("bytes that are not a frame header".into());
        }
        let kind = match bytes[0] {
            1 => Kind::Data,
            2 => Kind::Stuck,
            3 => Kind::Abort,
            other => return Err(format!("unknown frame kind {other}")),
        };
        let op = Op::from_code(bytes[1]).ok_or_else(|| format!("unknown op code {}", bytes[1]))?;
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        Ok(Frame {
            kind,
            op,
            aux: u32::from_le_bytes(bytes[4..8].try_into().unwrap()),
            seq: u64_at(8),
            total: u64_at(16),
            len: u64_at(24),
        })
    }
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} frame of {} #{} (aux {}, total {}, {} bytes)",
            self.kind,
            self.op.name(),
            self.seq,
            self.aux,
            self.total,
            self.len
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Hello {
        Hello { job: "job-7/dp".into(), generation: 42, from_rank: 3, to_rank: 4, world: 8, lane: Lane::Direct }
    }

    /// Decodes a hello the way a listener reads one.
    fn decode(bytes: &[u8]) -> Result<Hello, String> {
        let prefix: [u8; HELLO_PREFIX] = bytes.get(..HELLO_PREFIX).ok_or("short")?.try_into().unwrap();
        let rest = Hello::rest_len(&prefix)?;
        Hello::decode_rest(bytes.get(HELLO_PREFIX..HELLO_PREFIX + rest).ok_or("short")?)
    }

    #[test]
    fn hello_round_trips() {
        let bytes = hello().encode(&[9; NONCE_LEN]);
        let prefix: [u8; HELLO_PREFIX] = bytes[..HELLO_PREFIX].try_into().unwrap();
        assert_eq!(Hello::rest_len(&prefix).unwrap(), bytes.len() - HELLO_PREFIX);
        assert_eq!(decode(&bytes).unwrap(), hello());
        assert!(bytes.ends_with(&[9; NONCE_LEN]), "the nonce travels last");
    }

    #[test]
    fn hello_with_another_version_is_refused() {
        let mut bytes = hello().encode(&[0; NONCE_LEN]);
        bytes[4] = 2;
        let prefix: [u8; HELLO_PREFIX] = bytes[..HELLO_PREFIX].try_into().unwrap();
        assert!(Hello::rest_len(&prefix).unwrap_err().contains("version 2"));
        assert!(Hello::rest_len(b"GET / HT").is_err());
    }

    #[test]
    fn frame_and_answers_round_trip() {
        let frame = Frame {
            kind: Kind::Abort,
            op: Op::Broadcast,
            aux: 5,
            seq: u64::MAX - 1,
            total: Blame::Closed as u64,
            len: 17,
        };
        assert_eq!(Frame::decode(&frame.encode()).unwrap(), frame);
        let mut garbage = frame.encode();
        garbage[3] = 0;
        assert!(Frame::decode(&garbage).is_err());
        let challenge = Answer::Challenge { nonce: [1; NONCE_LEN], proof: [2; PROOF_LEN] };
        for answer in [Answer::Accepted, Answer::Stale { newest: 9 }, challenge] {
            let bytes = answer.encode();
            assert_eq!(Answer::rest_len(bytes[0]).unwrap(), bytes.len() - 1);
            assert_eq!(Answer::decode(bytes[0], &bytes[1..]).unwrap(), answer);
        }
        assert!(Answer::decode(2, &[0; 7]).is_err());
        assert!(Answer::rest_len(0).is_err());
    }

    proptest! {
        // 4096 cases in every test run; `PROPTEST_CASES=N` runs N (longer, by hand).
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(4096),
            ..ProptestConfig::default()
        })]

        /// Whatever bytes arrive, the decoders answer with a value or an
        /// error, never a panic.
        #[test]
        fn the_handshake_decoders_take_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = decode(&bytes);
            let _ = Hello::decode_rest(&bytes);
            if let Some((&status, rest)) = bytes.split_first() {
                let _ = Answer::rest_len(status);
                let _ = Answer::decode(status, rest);
            }
        }

        /// A valid prefix in front of arbitrary bytes: the length checks
        /// hold whatever the job id and tail are.
        #[test]
        fn a_valid_prefix_with_any_rest_never_panics(
            job_len in 0u16..1100,
            rest in proptest::collection::vec(any::<u8>(), 0..1200),
        ) {
            let mut prefix = [0u8; HELLO_PREFIX];
            prefix[..4].copy_from_slice(&MAGIC);
            prefix[4..6].copy_from_slice(&VERSION.to_le_bytes());
            prefix[6..8].copy_from_slice(&job_len.to_le_bytes());
            if let Ok(n) = Hello::rest_len(&prefix) {
                prop_assert!(n <= MAX_JOB_LEN + HELLO_TAIL);
                let _ = Hello::decode_rest(&rest[..n.min(rest.len())]);
            }
        }

        #[test]
        fn every_hello_round_trips(
            job in "[a-z0-9#./-]{0,64}",
            generation in any::<u64>(),
            ranks in any::<(u32, u32, u32)>(),
            lane in 1u32..4,
            nonce in any::<[u8; 32]>(),
        ) {
            let lane = Lane::from_code(lane).unwrap();
            let h = Hello { job, generation, from_rank: ranks.0, to_rank: ranks.1, world: ranks.2, lane };
            prop_assert_eq!(decode(&h.encode(&nonce)).unwrap(), h);
        }
    }
}
