//! The job file as written: serde structs that mirror the YAML, with positions.
//!
//! Every section denies unknown fields and keeps `Spanned` values so that
//! validation can point at the line and column of a bad value. Nothing here
//! checks meaning; that is `validate`'s job. `model` and `data` are flat
//! structs holding the fields of every kind (serde's internally tagged enums
//! would lose the positions); validation rejects fields foreign to the kind.

use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Unexpected, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

use crate::{TokenDtype, TokenFormat};

pub(crate) type S<T> = Spanned<T>;

/// The whole file, version 1.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJob {
    /// Checked before everything else, from a [`VersionProbe`].
    #[allow(dead_code)]
    pub version: Option<S<Any>>,
    pub name: S<String>,
    pub model: S<RawModel>,
    pub data: S<RawData>,
    pub train: S<RawTrain>,
    pub parallelism: Option<S<RawParallelism>>,
    pub workers: Option<S<RawWorkers>>,
    pub checkpoint: Option<S<RawCheckpoint>>,
    pub registry: Option<S<RawRegistry>>,
    pub eval: Option<S<RawEval>>,
    pub priority: Option<S<i64>>,
    pub metrics: Option<S<RawMetrics>>,
}

/// `metrics`: where training's metrics go besides the coordinator.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    pub tensorboard: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEval {
    pub data: S<RawData>,
    pub every: Option<S<u64>>,
    pub batches: Option<S<usize>>,
    pub batch: Option<S<usize>>,
}

/// Reads only `version`, whatever else the file holds, so that a file of
/// another version is reported as such rather than by its unknown fields.
#[derive(Debug, Deserialize)]
pub(crate) struct VersionProbe {
    pub version: Option<S<Any>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ModelKind {
    Mlp,
    Gpt,
    Llama,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub kind: S<ModelKind>,
    pub layers: Option<S<Layers>>,
    pub d_model: Option<S<usize>>,
    pub heads: Option<S<usize>>,
    pub context: Option<S<usize>>,
    pub vocab: Option<S<usize>>,
    pub kv_heads: Option<S<usize>>,
    pub ffn: Option<S<usize>>,
    pub rope_theta: Option<S<f64>>,
    pub rope_scaling: Option<S<RawRopeScaling>>,
    pub norm_eps: Option<S<f64>>,
    pub tie_embeddings: Option<S<bool>>,
    pub from: Option<S<String>>,
    pub init: Option<S<ModelInit>>,
}

/// `model.rope_scaling` (llama): Llama 3's frequency scaling.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRopeScaling {
    pub factor: S<f64>,
    pub low_freq_factor: S<f64>,
    pub high_freq_factor: S<f64>,
    pub original_context: S<usize>,
}

/// `model.init` (llama): where the initial weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ModelInit {
    Random,
    Pretrained,
}

/// `model.layers`: a list of widths (mlp) or a block count (gpt).
#[derive(Debug)]
pub(crate) enum Layers {
    Count(usize),
    Widths(Vec<S<usize>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DataKind {
    Synthetic,
    Features,
    Tokens,
    Text,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawData {
    pub kind: S<DataKind>,
    pub seed: Option<S<u64>>,
    pub samples: Option<S<u64>>,
    pub path: Option<S<PathList>>,
    pub dtype: Option<S<TokenDtype>>,
    pub tokenizer: Option<S<String>>,
    pub format: Option<S<TokenFormat>>,
}

/// `data.path`: one path, or (kind `tokens`) a list of them.
#[derive(Debug)]
pub(crate) enum PathList {
    One(String),
    Many(Vec<S<String>>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTrain {
    pub steps: S<u64>,
    pub global_batch: S<usize>,
    pub micro_batch: Option<S<usize>>,
    pub seed: Option<S<u64>>,
    pub optimizer: Option<S<RawOptimizer>>,
    pub schedule: Option<S<RawSchedule>>,
    pub grad_clip: Option<S<f64>>,
    pub precision: Option<S<Any>>,
    pub device: Option<S<Any>>,
    pub activation_checkpointing: Option<S<bool>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OptimizerKind {
    AdamW,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOptimizer {
    #[allow(dead_code)]
    pub kind: Option<S<OptimizerKind>>,
    pub lr: Option<S<f64>>,
    pub betas: Option<S<Vec<S<f64>>>>,
    pub eps: Option<S<f64>>,
    pub weight_decay: Option<S<f64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ScheduleKind {
    Cosine,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSchedule {
    #[allow(dead_code)]
    pub kind: Option<S<ScheduleKind>>,
    pub warmup_steps: Option<S<u64>>,
    pub min_lr: Option<S<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawParallelism {
    /// Read as any value and interpreted by validation, so that a bad value
    /// is reported at its own position.
    pub dp: Option<S<Any>>,
    /// Gradient bucket size in MiB.
    pub bucket_mb: Option<S<f64>>,
    /// Pipeline stages.
    pub pp: Option<S<Any>>,
    /// ZeRO stage.
    pub zero: Option<S<Any>>,
    /// Pipeline schedule.
    pub schedule: Option<S<Any>>,
    /// Micro-batches per replica and step.
    pub micro_batches: Option<S<Any>>,
    /// Layers per pipeline stage.
    pub split: Option<S<Vec<S<u64>>>>,
    /// Overlap communication with computation.
    pub overlap: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWorkers {
    pub min: Option<S<usize>>,
    pub max: Option<S<usize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCheckpoint {
    pub url: Option<S<String>>,
    pub every: Option<S<u64>>,
    pub keep: Option<S<usize>>,
    pub resume_from: Option<S<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RegistryKind {
    Mlflow,
    Builtin,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRegistry {
    pub kind: S<RegistryKind>,
    pub url: Option<S<String>>,
    pub model: Option<S<String>>,
    pub experiment: Option<S<String>>,
    pub alias: Option<S<String>>,
    pub tags: Option<S<std::collections::BTreeMap<String, S<String>>>>,
}

impl<'de> Deserialize<'de> for Layers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LayersVisitor)
    }
}

struct LayersVisitor;

impl<'de> Visitor<'de> for LayersVisitor {
    type Value = Layers;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of layer widths (mlp) or a number of blocks (gpt)")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Layers, E> {
        usize::try_from(v).map(Layers::Count).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Layers, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Layers, A::Error> {
        let mut widths = Vec::new();
        while let Some(w) = seq.next_element::<S<usize>>()? {
            widths.push(w);
        }
        Ok(Layers::Widths(widths))
    }
}

impl<'de> Deserialize<'de> for PathList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PathListVisitor)
    }
}

struct PathListVisitor;

impl<'de> Visitor<'de> for PathListVisitor {
    type Value = PathList;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a path or a list of paths")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<PathList, E> {
        Ok(PathList::One(v.to_string()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PathList, A::Error> {
        let mut paths = Vec::new();
        while let Some(p) = seq.next_element::<S<String>>()? {
            if paths.len() == crate::defaults::TOKEN_PATHS_LIMIT {
                return Err(de::Error::custom(format!(
                    "more than {} paths; name the shards with a pattern such as `corpus/train-*.bin`",
                    crate::defaults::TOKEN_PATHS_LIMIT
                )));
            }
            paths.push(p);
        }
        Ok(PathList::Many(paths))
    }
}

/// Any YAML value, remembered only as much as validation needs: reserved
/// keys and `version` must accept every value so that they can be refused
/// with a message of our own.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Any {
    Int(u64),
    Str(String),
    /// Anything else, as a short human-readable rendering.
    Other(String),
}

impl fmt::Display for Any {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Any::Int(n) => write!(f, "{n}"),
            Any::Str(s) => {
                const MAX: usize = 40;
                let shown: String = s.chars().take(MAX).collect();
                let more = if s.chars().nth(MAX).is_some() { "..." } else { "" };
                write!(f, "`{shown}{more}`")
            }
            Any::Other(s) => f.write_str(s),
        }
    }
}

impl<'de> Deserialize<'de> for Any {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AnyVisitor)
    }
}

struct AnyVisitor;

impl<'de> Visitor<'de> for AnyVisitor {
    type Value = Any;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Any, E> {
        Ok(Any::Other(v.to_string()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Any, E> {
        Ok(u64::try_from(v).map_or_else(|_| Any::Other(v.to_string()), Any::Int))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Any, E> {
        Ok(Any::Int(v))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Any, E> {
        Ok(u64::try_from(v).map_or_else(|_| Any::Other(v.to_string()), Any::Int))
    }
    fn visit_u128<E>(self, v: u128) -> Result<Any, E> {
        Ok(u64::try_from(v).map_or_else(|_| Any::Other(v.to_string()), Any::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Any, E> {
        Ok(Any::Other(v.to_string()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Any, E> {
        Ok(Any::Str(v.to_owned()))
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<Any, E> {
        Ok(Any::Other("binary data".into()))
    }
    fn visit_none<E>(self) -> Result<Any, E> {
        Ok(Any::Other("null".into()))
    }
    fn visit_unit<E>(self) -> Result<Any, E> {
        Ok(Any::Other("null".into()))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Any, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Any, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Any, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Any::Other("a list".into()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Any, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Any::Other("a mapping".into()))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<Any, A::Error> {
        Err(de::Error::invalid_type(Unexpected::Enum, &self))
    }
}
