//! Job file v1: parse the YAML a researcher writes into a validated [`JobSpec`].
//!
//! Pure: the caller passes the source text and a name for it; nothing here
//! reads files or the environment. Every rejection is a [`SpecError`] naming
//! the field path and the line/column in the source. The format is described
//! field by field in docs/jobfile.md, the job file reference.
//!
//! ```
//! let spec = flotilla_jobspec::parse(
//!     "name: demo\n\
//!      model: {kind: mlp, layers: [4, 16, 3]}\n\
//!      data: {kind: synthetic, seed: 7}\n\
//!      train: {steps: 100, global_batch: 32}\n",
//!     "demo.yaml",
//! )
//! .unwrap();
//! assert_eq!(spec.train.micro_batch, 32);
//! assert_eq!(spec.workers.max, 1);
//! ```

pub mod defaults;
mod error;
pub mod glob;
pub mod hf_config;
mod paths;
mod raw;
mod spec;
pub mod sweep;
pub mod tokenizer_json;
mod validate;

pub use error::SpecError;
pub use spec::{
    AdamWSpec, CheckpointSpec, DataSpec, DeviceChoice, DpSize, EvalSpec, GptSpec, JobSpec, LlamaSpec, MetricsSpec,
    MlpSpec, ModelSpec, ParallelismSpec, PipelineSchedule, Precision, RegistryKind, RegistrySpec, RopeScaling,
    ScheduleSpec, TokenDtype, TokenFormat, TrainSpec, WorkersSpec,
};

/// Checks a registered model name and an alias as `registry.model` and
/// `registry.alias` are checked; the message says what is allowed.
pub use validate::registry::{alias as check_alias, model_name as check_model_name};

use serde::de::DeserializeOwned;

/// Reads a file the job file names (the path as written there, relative to
/// the job file's folder), at most `limit` bytes; the error says why not, in
/// words. Validation reads a Llama's `model.from` `config.json` and a text
/// data set's `tokenizer` this way.
pub type ReadFile<'a> = dyn Fn(&str, u64) -> Result<String, String> + 'a;

/// Parses and validates a job file. `origin` names the source in messages
/// (usually the file's path as the user gave it).
///
/// The files it reads are the `config.json` of a Llama's `model.from`
/// folder (at most [`hf_config::CONFIG_MAX_BYTES`]) and the `tokenizer.json`
/// of `kind: text` data (at most [`tokenizer_json::TOKENIZER_MAX_BYTES`]),
/// relative paths taken from the job file's folder (`origin`'s parent).
/// Never panics, whatever `source` holds.
pub fn parse(source: &str, origin: &str) -> Result<JobSpec, SpecError> {
    let base = std::path::Path::new(origin).parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    parse_with(source, origin, &|path: &str, limit: u64| read_file(&base.join(path), limit))
}

/// [`parse`] with the reader of the files the job file names given: pure
/// when `read_file` is.
pub fn parse_with(source: &str, origin: &str, read_file: &ReadFile) -> Result<JobSpec, SpecError> {
    let cx = validate::Ctx { origin, source, read_file };
    // The version decides how to read the rest, so it is read first, by
    // itself: a file of another version fails on its version, not on fields
    // this version does not know.
    if let Ok(probe) = serde_saphyr::from_str_with_options::<raw::VersionProbe>(source, yaml_options()) {
        validate::version(&cx, probe.version.as_ref())?;
    }
    let raw: raw::RawJob = deserialize(source, origin)?;
    validate::job(raw, &cx)
}

/// A [`ReadFile`] that reads paths relative to `base` from the file system.
pub fn files_under(base: std::path::PathBuf) -> impl Fn(&str, u64) -> Result<String, String> {
    move |path: &str, limit: u64| read_file(&base.join(path), limit)
}

fn read_file(path: &std::path::Path, limit: u64) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(limit + 1).read_to_string(&mut text).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > limit {
        return Err(format!("{} is larger than {limit} bytes", path.display()));
    }
    Ok(text)
}

fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options
}

/// YAML → `T`, with the field path, line and column of any error, in the
/// job file's error format. For other flotilla YAML files (the coordinator's
/// configuration).
pub fn read_yaml<T: DeserializeOwned>(source: &str, origin: &str) -> Result<T, SpecError> {
    deserialize(source, origin)
}

/// YAML → `T`, with the field path of any error.
pub(crate) fn deserialize<T: DeserializeOwned>(source: &str, origin: &str) -> Result<T, SpecError> {
    let mut segments = Vec::new();
    let result = serde_saphyr::with_deserializer_from_str_with_options(source, yaml_options(), |de| {
        let mut track = serde_path_to_error::Track::new();
        let value = T::deserialize(serde_path_to_error::Deserializer::new(de, &mut track));
        if value.is_err() {
            segments = error::path_segments(&track.path());
        }
        value
    });
    result.map_err(|e| error::from_yaml(&e, segments, source, origin))
}

#[cfg(test)]
mod tests;
