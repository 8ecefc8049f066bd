//! TensorBoard event files (`metrics.tensorboard` in the job file): rank 0
//! appends each step's scalars to `events.out.tfevents.*` in that folder,
//! one file per generation. A file is a sequence of records, each framed
//! as TFRecord frames them (length, its masked CRC-32C, the bytes, their
//! masked CRC-32C) and holding one `Event` protobuf message: the first
//! names the file version, the others carry a `Summary` of scalar values.
//! The messages are declared here with prost, only the fields written.
//! A write that fails is logged once and writing stops: the event file
//! never stops training.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;

/// `Event` (tensorflow/core/util/event.proto), the fields written.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// The first record of a file: `brain.Event:2`.
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `Summary` (tensorflow/core/framework/summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `Summary.Value`: a tag and a scalar (`simple_value`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// The version string TensorBoard's readers expect first.
pub const FILE_VERSION: &str = "brain.Event:2";

/// CRC-32C as TFRecord stores it: rotated and offset, so that a CRC of
/// data that holds CRCs is not a weak one.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord frame around `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The frames of a file, checked; `None` at the first frame that is cut
/// short or whose CRC does not match.
pub fn read_frames(mut bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len_bytes: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
        let len_crc = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?);
        if masked_crc(&len_bytes) != len_crc {
            return None;
        }
        let len = usize::try_from(u64::from_le_bytes(len_bytes)).ok()?;
        let data = bytes.get(12..12usize.checked_add(len)?)?;
        let crc = u32::from_le_bytes(bytes.get(12 + len..16 + len)?.try_into().ok()?);
        if masked_crc(data) != crc {
            return None;
        }
        out.push(data.to_vec());
        bytes = &bytes[16 + len..];
    }
    Some(out)
}

/// An event file being written.
pub struct EventWriter {
    path: PathBuf,
    out: Option<BufWriter<File>>,
}

fn now_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// A new event file in `dir` (made if missing) for `job`'s generation
    /// `generation`.
    pub fn create(dir: &Path, job: &str, generation: u64) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let wall = now_secs();
        let host = hostname();
        let name = format!("events.out.tfevents.{}.{host}.{}.{job}-g{generation}", wall as u64, std::process::id());
        let path = dir.join(name);
        let out = BufWriter::new(File::create(&path)?);
        let mut w = EventWriter { path, out: Some(out) };
        w.write(&Event { wall_time: wall, step: 0, what: Some(What::FileVersion(FILE_VERSION.into())) });
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends the scalars of `step` and flushes, so that TensorBoard sees
    /// them while the job trains.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        let value = values
            .iter()
            .map(|(tag, v)| SummaryValue { tag: (*tag).to_string(), simple_value: Some(*v as f32) })
            .collect();
        let event = Event { wall_time: now_secs(), step: step as i64, what: Some(What::Summary(Summary { value })) };
        self.write(&event);
    }

    fn write(&mut self, event: &Event) {
        let Some(out) = self.out.as_mut() else { return };
        let written = out.write_all(&frame(&event.encode_to_vec())).and_then(|()| out.flush());
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "writing the TensorBoard event file failed; no more events");
            self.out = None;
        }
    }
}

fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(64).collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_tfrecord_s_masked_crcs() {
        // The mask of TFRecord's framing, written as its definition is.
        let crc = crc32c::crc32c(b"abc");
        #[allow(clippy::manual_rotate)]
        let masked = ((crc >> 15) | (crc << 17)).wrapping_add(0xa282ead8);
        assert_eq!(masked_crc(b"abc"), masked);
        let f = frame(b"hello");
        assert_eq!(f.len(), 5 + 16);
        assert_eq!(&f[..8], &5u64.to_le_bytes());
        assert_eq!(read_frames(&f), Some(vec![b"hello".to_vec()]));
        let mut bad = f.clone();
        bad[14] ^= 1;
        assert_eq!(read_frames(&bad), None, "a flipped bit is caught");
        assert_eq!(read_frames(&f[..f.len() - 1]), None, "a cut frame is caught");
    }

    #[test]
    fn an_event_file_holds_the_version_then_the_scalars() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), "j-1", 2).unwrap();
        w.scalars(7, &[("train/loss", 0.25), ("train/lr", 1e-3)]);
        let name = w.path().file_name().unwrap().to_string_lossy().to_string();
        assert!(name.starts_with("events.out.tfevents.") && name.ends_with("j-1-g2"), "{name}");
        let frames = read_frames(&std::fs::read(w.path()).unwrap()).unwrap();
        assert_eq!(frames.len(), 2);
        let first = Event::decode(frames[0].as_slice()).unwrap();
        assert_eq!(first.what, Some(What::FileVersion(FILE_VERSION.into())));
        let second = Event::decode(frames[1].as_slice()).unwrap();
        assert_eq!(second.step, 7);
        let Some(What::Summary(s)) = second.what else { panic!("a summary: {second:?}") };
        assert_eq!(s.value[0], SummaryValue { tag: "train/loss".into(), simple_value: Some(0.25) });
        assert_eq!(s.value[1].simple_value, Some(1e-3f32));
    }
}
