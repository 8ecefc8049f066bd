//! The models a job file can name: an MLP classifier, a decoder-only
//! transformer (GPT) and a Llama ([`llama`]), each a chain of units ([`Unit`]) that pipelines cut
//! at and ZeRO partitions. A unit is a pure function of its parameters and
//! its input ([`forward`]); the engine owns every tensor. Each model
//! returns the *sum* of its per-sample losses, so that gradients add up
//! across micro-batches and ranks into the gradient of the global batch's
//! mean loss.
//!
//! Mixed precision (`train.precision: bf16`) is the caller's choice of
//! parameter dtype: given bf16 parameters, a unit runs its matrix products,
//! attention and activations in bf16, and its layer norms (on values and
//! affine parameters upcast to f32), softmax and loss in f32, rounding each
//! result back to bf16. Given f32 parameters, everything is f32. The PyTorch
//! reference (`scripts/oracle/reference.py`) casts at exactly these points.

use flotilla_jobspec::{GptSpec, MlpSpec, ModelSpec};
use tch::nn;
use tch::{Kind, Reduction, Tensor};

use crate::checkpoint::Layout;

pub mod llama;

/// One layer a pipeline can cut the model at: what runs between two
/// activations. A GPT is its embedding, each block and its head (final
/// norm and projection to the vocabulary); an MLP is its linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Linear layer `index`, followed by a ReLU unless it is the last.
    Linear {
        index: usize,
        relu: bool,
    },
    Embedding,
    Block(usize),
    Head,
}

const BLOCK_TENSORS: [&str; 12] = [
    "ln1.weight",
    "ln1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "ln2.weight",
    "ln2.bias",
    "mlp.fc.weight",
    "mlp.fc.bias",
    "mlp.proj.weight",
    "mlp.proj.bias",
];

impl Unit {
    /// The model's units in order, with their parameters' names in the
    /// order [`forward`] takes them.
    pub fn all(spec: &ModelSpec) -> Vec<(Unit, Vec<String>)> {
        match spec {
            ModelSpec::Mlp(m) => {
                let n = m.layers.len() - 1;
                (0..n)
                    .map(|i| {
                        let names = vec![format!("layers.{i}.weight"), format!("layers.{i}.bias")];
                        (Unit::Linear { index: i, relu: i + 1 < n }, names)
                    })
                    .collect()
            }
            ModelSpec::Gpt(g) => {
                let mut out = vec![(Unit::Embedding, vec!["wte.weight".to_string(), "wpe".to_string()])];
                for i in 0..g.layers {
                    out.push((Unit::Block(i), BLOCK_TENSORS.iter().map(|n| format!("blocks.{i}.{n}")).collect()));
                }
                out.push((Unit::Head, vec!["ln_f.weight".into(), "ln_f.bias".into(), "head.weight".into()]));
                out
            }
            ModelSpec::Llama(l) => llama::units(l),
        }
    }
}

/// The shapes of every parameter, in unit order ([`Unit::all`]).
pub fn shapes(spec: &ModelSpec) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    match spec {
        ModelSpec::Mlp(m) => {
            for (i, w) in m.layers.windows(2).enumerate() {
                out.push((format!("layers.{i}.weight"), vec![w[1], w[0]]));
                out.push((format!("layers.{i}.bias"), vec![w[1]]));
            }
        }
        ModelSpec::Gpt(g) => {
            let d = g.d_model;
            out.push(("wte.weight".into(), vec![g.vocab, d]));
            out.push(("wpe".into(), vec![g.context, d]));
            for i in 0..g.layers {
                let dims: [Vec<usize>; 12] = [
                    vec![d],
                    vec![d],
                    vec![3 * d, d],
                    vec![3 * d],
                    vec![d, d],
                    vec![d],
                    vec![d],
                    vec![d],
                    vec![4 * d, d],
                    vec![4 * d],
                    vec![d, 4 * d],
                    vec![d],
                ];
                for (n, s) in BLOCK_TENSORS.iter().zip(dims) {
                    out.push((format!("blocks.{i}.{n}"), s));
                }
            }
            out.push(("ln_f.weight".into(), vec![d]));
            out.push(("ln_f.bias".into(), vec![d]));
            out.push(("head.weight".into(), vec![g.vocab, d]));
        }
        ModelSpec::Llama(l) => out = llama::shapes(l),
    }
    out
}

/// The parameters' layout (names, shapes, flat offsets) in unit order: what
/// the engine's flat tensors, checkpoints and collectives use.
pub fn layout(spec: &ModelSpec) -> Layout {
    Layout::new(shapes(spec))
}

/// The activation unit `unit` produces for `batch` samples, as a shape.
pub fn output_shape(spec: &ModelSpec, unit: Unit, batch: usize) -> Vec<i64> {
    match (spec, unit) {
        (ModelSpec::Mlp(m), Unit::Linear { index, .. }) => vec![batch as i64, m.layers[index + 1] as i64],
        (ModelSpec::Gpt(g), Unit::Head) => vec![batch as i64, g.context as i64, g.vocab as i64],
        (ModelSpec::Gpt(g), _) => vec![batch as i64, g.context as i64, g.d_model as i64],
        (ModelSpec::Llama(l), Unit::Head) => vec![batch as i64, l.context as i64, l.vocab as i64],
        (ModelSpec::Llama(l), _) => vec![batch as i64, l.context as i64, l.d_model as i64],
        (ModelSpec::Mlp(_), _) => unreachable!("an MLP has only linear units"),
    }
}

/// Draws the initial parameters of one unit at `p`, in the order the whole
/// model has always drawn them, from the global torch generator.
fn init_unit(p: &nn::Path, spec: &ModelSpec, unit: Unit) {
    match (spec, unit) {
        (ModelSpec::Mlp(MlpSpec { layers }), Unit::Linear { index, .. }) => {
            nn::linear(p / "layers" / index, layers[index] as i64, layers[index + 1] as i64, Default::default());
        }
        (ModelSpec::Gpt(g), _) => gpt_init_unit(p, g, unit),
        (ModelSpec::Llama(_), _) => unreachable!("a Llama's units are drawn by llama::init_unit"),
        (ModelSpec::Mlp(_), _) => unreachable!("an MLP has only linear units"),
    }
}

fn gpt_init_unit(p: &nn::Path, spec: &GptSpec, unit: Unit) {
    let d = spec.d_model as i64;
    let normal = nn::Init::Randn { mean: 0.0, stdev: 0.02 };
    let linear = |p: nn::Path, i: usize, o: usize, bias: bool| {
        let cfg = nn::LinearConfig { ws_init: normal, bs_init: Some(nn::Init::Const(0.0)), bias };
        nn::linear(p, i as i64, o as i64, cfg);
    };
    match unit {
        Unit::Embedding => {
            let emb = nn::EmbeddingConfig { ws_init: normal, ..Default::default() };
            nn::embedding(p / "wte", spec.vocab as i64, d, emb);
            let _ = p.var("wpe", &[spec.context as i64, d], normal);
        }
        Unit::Block(i) => {
            let b = p / "blocks" / i;
            nn::layer_norm(&b / "ln1", vec![d], Default::default());
            linear(&b / "attn" / "qkv", spec.d_model, 3 * spec.d_model, true);
            linear(&b / "attn" / "proj", spec.d_model, spec.d_model, true);
            nn::layer_norm(&b / "ln2", vec![d], Default::default());
            linear(&b / "mlp" / "fc", spec.d_model, 4 * spec.d_model, true);
            linear(&b / "mlp" / "proj", 4 * spec.d_model, spec.d_model, true);
        }
        Unit::Head => {
            nn::layer_norm(p / "ln_f", vec![d], Default::default());
            linear(p / "head", spec.d_model, spec.vocab, false);
        }
        Unit::Linear { .. } => unreachable!("a GPT has no linear units"),
    }
}

/// The initial parameters, one unit at a time and in unit order, drawn from
/// `seed`: the same values on every rank, and the same as a whole model
/// drawn at once. A rank keeps the units (or the chunks of them) it holds
/// and drops the rest, so that it never holds the whole model. Nothing else
/// may draw from the global torch generator while this is iterated: two
/// inits in one process (ranks on threads, tests) take turns.
pub struct UnitInit<'a> {
    /// Held while the init lives: libtorch's generator is the process's.
    _generator: std::sync::MutexGuard<'static, ()>,
    spec: &'a ModelSpec,
    units: std::vec::IntoIter<(Unit, Vec<String>)>,
    /// A tied Llama's embedding, which its head copies.
    embedding: Option<Tensor>,
}

impl<'a> UnitInit<'a> {
    pub fn new(spec: &'a ModelSpec, seed: u64) -> UnitInit<'a> {
        static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let generator = GENERATOR.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tch::manual_seed(seed as i64);
        UnitInit { _generator: generator, spec, units: Unit::all(spec).into_iter(), embedding: None }
    }
}

impl Iterator for UnitInit<'_> {
    /// The unit's parameters, flat, f32, in [`Unit::all`]'s order.
    type Item = Tensor;

    fn next(&mut self) -> Option<Tensor> {
        let (unit, names) = self.units.next()?;
        if let ModelSpec::Llama(l) = self.spec {
            let parts: Vec<Tensor> =
                llama::init_unit(l, unit, self.embedding.as_ref()).iter().map(|t| t.reshape([-1])).collect();
            if unit == Unit::Embedding && llama::tied(l) {
                self.embedding = Some(parts[0].shallow_clone());
            }
            return Some(Tensor::cat(&parts, 0));
        }
        let vs = nn::VarStore::new(tch::Device::Cpu);
        init_unit(&vs.root(), self.spec, unit);
        let vars = vs.variables();
        let parts: Vec<Tensor> = names.iter().map(|n| vars[n].detach().reshape([-1])).collect();
        Some(Tensor::cat(&parts, 0))
    }
}

/// Whether the model's output projection is its token embedding (a Llama
/// with `tie_embeddings`).
pub fn tied(spec: &ModelSpec) -> bool {
    matches!(spec, ModelSpec::Llama(l) if llama::tied(l))
}

/// The whole model's initial parameters, flat in [`layout`] order (what
/// `flotilla export-init` writes).
pub fn initial_weights(spec: &ModelSpec, seed: u64) -> (Layout, Vec<f32>) {
    let layout = layout(spec);
    let flat = Tensor::cat(&UnitInit::new(spec, seed).collect::<Vec<_>>(), 0);
    let mut out = vec![0f32; layout.total];
    flat.copy_data(&mut out, layout.total);
    (layout, out)
}

const LN_EPS: f64 = 1e-5;

/// Layer norm computed in f32 whatever the activations' dtype, rounded back
/// to it.
fn layer_norm(z: &Tensor, w: &Tensor, b: &Tensor, d: i64) -> Tensor {
    let kind = z.kind();
    z.to_kind(Kind::Float)
        .layer_norm([d], Some(w.to_kind(Kind::Float)), Some(b.to_kind(Kind::Float)), LN_EPS, true)
        .to_kind(kind)
}

/// Runs one unit on `x` with its parameters `p` (in [`Unit::all`]'s
/// order, all of one dtype): the features or token ids for the first unit,
/// the previous unit's output otherwise. The output has the parameters'
/// dtype.
pub fn forward(spec: &ModelSpec, unit: Unit, p: &[Tensor], x: &Tensor) -> Tensor {
    let kind = p[0].kind();
    match (spec, unit) {
        (_, Unit::Linear { relu, .. }) => {
            let h = x.to_kind(kind).linear(&p[0], Some(&p[1]));
            if relu {
                h.relu()
            } else {
                h
            }
        }
        (ModelSpec::Gpt(_), Unit::Embedding) => {
            let t = x.size()[1];
            Tensor::embedding(&p[0], x, -1, false, false) + p[1].narrow(0, 0, t)
        }
        (ModelSpec::Gpt(g), Unit::Block(_)) => {
            let (b, t, d) = x.size3().expect("activations are [batch, time, d_model]");
            let h_count = g.heads as i64;
            let hd = d / h_count;
            let a = layer_norm(x, &p[0], &p[1], d);
            let qkv = a.linear(&p[2], Some(&p[3])).split(d, 2);
            let heads = |z: &Tensor| z.view([b, t, h_count, hd]).transpose(1, 2);
            let (q, k, v) = (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]));
            let y = if x.device().is_cuda() {
                // libtorch's fused attention (flash or memory-efficient
                // kernels where it picks them): the causal mask and the
                // softmax without the [t, t] scores in memory.
                Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, false)
            } else {
                // On CPUs the explicit form, with the softmax in f32 (what
                // the PyTorch oracle reproduces step for step).
                let mask = Tensor::ones([t, t], (Kind::Bool, x.device())).triu(1);
                (q.matmul(&k.transpose(-2, -1)) * (1.0 / (hd as f64).sqrt()))
                    .masked_fill(&mask, f64::NEG_INFINITY)
                    .softmax(-1, Kind::Float)
                    .to_kind(kind)
                    .matmul(&v)
            };
            let y = y.transpose(1, 2).contiguous().view([b, t, d]);
            let h = x + y.linear(&p[4], Some(&p[5]));
            let m =
                layer_norm(&h, &p[6], &p[7], d).linear(&p[8], Some(&p[9])).gelu("none").linear(&p[10], Some(&p[11]));
            h + m
        }
        (ModelSpec::Gpt(g), Unit::Head) => {
            let d = g.d_model as i64;
            layer_norm(x, &p[0], &p[1], d).linear::<Tensor>(&p[2], None)
        }
        (ModelSpec::Llama(l), _) => llama::forward(l, unit, p, x),
        (ModelSpec::Mlp(_), _) => unreachable!("an MLP has only linear units"),
    }
}

/// Sum over the batch of each sample's loss, from the last unit's output
/// (cross-entropy in f32; for a language model the mean over the sample's
/// positions).
pub fn loss_sum(spec: &ModelSpec, out: &Tensor, y: &Tensor) -> Tensor {
    let out = out.to_kind(Kind::Float);
    match spec {
        ModelSpec::Mlp(_) => out.cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0),
        ModelSpec::Gpt(GptSpec { vocab, .. }) | ModelSpec::Llama(flotilla_jobspec::LlamaSpec { vocab, .. }) => {
            let t = y.size()[1];
            let flat = out.view([-1, *vocab as i64]);
            flat.cross_entropy_loss::<Tensor>(&y.reshape([-1]), None, Reduction::Sum, -100, 0.0) / (t as f64)
        }
    }
}

/// Splits a unit's flat parameters into its tensors, shaped.
pub fn unflatten(flat: &Tensor, shapes: &[Vec<i64>]) -> Vec<Tensor> {
    let mut at = 0;
    shapes
        .iter()
        .map(|s| {
            let n: i64 = s.iter().product();
            let t = flat.narrow(0, at, n).view(s.as_slice());
            at += n;
            t
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_jobspec::MlpSpec;

    fn params(spec: &ModelSpec, seed: u64) -> Vec<Vec<Tensor>> {
        let layout = layout(spec);
        let mut t = 0;
        UnitInit::new(spec, seed)
            .zip(Unit::all(spec))
            .map(|(flat, (_, names))| {
                let shapes: Vec<Vec<i64>> = names
                    .iter()
                    .map(|_| {
                        t += 1;
                        layout.shapes[t - 1].iter().map(|d| *d as i64).collect()
                    })
                    .collect();
                unflatten(&flat, &shapes)
            })
            .collect()
    }

    fn logits(spec: &ModelSpec, p: &[Vec<Tensor>], x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for ((unit, _), p) in Unit::all(spec).into_iter().zip(p) {
            h = forward(spec, unit, p, &h);
        }
        h
    }

    #[test]
    fn the_layout_is_the_units_tensors_in_order() {
        let spec = ModelSpec::Gpt(GptSpec { layers: 2, d_model: 8, heads: 2, context: 4, vocab: 10 });
        let names: Vec<String> = Unit::all(&spec).into_iter().flat_map(|(_, n)| n).collect();
        let l = layout(&spec);
        assert_eq!(l.names, names);
        let flat: Vec<Tensor> = UnitInit::new(&spec, 1).collect();
        assert_eq!(flat.iter().map(|t| t.numel()).sum::<usize>(), l.total, "the init fills the layout");
    }

    #[test]
    fn same_seed_gives_bit_identical_weights_and_another_seed_others() {
        let spec = ModelSpec::Gpt(GptSpec { layers: 1, d_model: 8, heads: 2, context: 4, vocab: 10 });
        let (la, a) = initial_weights(&spec, 5);
        let (_, b) = initial_weights(&spec, 5);
        let (_, c) = initial_weights(&spec, 6);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(la.names.contains(&"blocks.0.attn.qkv.weight".to_string()), "{:?}", la.names);
    }

    /// A tiny Llama with grouped-query attention and Llama 3's scaling.
    fn tiny_llama(d_model: usize, context: usize, vocab: usize) -> ModelSpec {
        ModelSpec::Llama(flotilla_jobspec::LlamaSpec {
            layers: 2,
            d_model,
            heads: 4,
            kv_heads: 2,
            ffn: 2 * d_model,
            vocab,
            context,
            max_positions: context,
            rope_theta: 10000.0,
            rope_scaling: Some(flotilla_jobspec::RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_positions: 4,
            }),
            norm_eps: 1e-5,
            tie_embeddings: false,
            from: None,
            pretrained: false,
        })
    }

    #[test]
    fn language_models_are_causal_in_both_precisions() {
        let gpt = ModelSpec::Gpt(GptSpec { layers: 2, d_model: 8, heads: 2, context: 5, vocab: 10 });
        for spec in [gpt, tiny_llama(16, 5, 10)] {
            let p = params(&spec, 1);
            let a = Tensor::from_slice(&[1i64, 2, 3, 4, 5]).view([1, 5]);
            let b = Tensor::from_slice(&[1i64, 2, 3, 9, 9]).view([1, 5]);
            for kind in [Kind::Float, Kind::BFloat16] {
                let p: Vec<Vec<Tensor>> = p.iter().map(|u| u.iter().map(|t| t.to_kind(kind)).collect()).collect();
                let (la, lb) = (logits(&spec, &p, &a), logits(&spec, &p, &b));
                assert_eq!(la.kind(), kind);
                let (la, lb) = (la.to_kind(Kind::Float), lb.to_kind(Kind::Float));
                let leaked = !la.narrow(1, 0, 3).allclose(&lb.narrow(1, 0, 3), 1e-6, 1e-6, false);
                assert!(!leaked, "{}: future tokens leaked", spec.kind());
                assert!(!la.narrow(1, 3, 1).allclose(&lb.narrow(1, 3, 1), 1e-6, 1e-6, false));
            }
        }
    }

    #[test]
    fn bf16_logits_stay_close_to_f32() {
        let gpt = ModelSpec::Gpt(GptSpec { layers: 2, d_model: 16, heads: 2, context: 6, vocab: 12 });
        for spec in [gpt, tiny_llama(32, 6, 12)] {
            let mut p = params(&spec, 3);
            if spec.kind() == "llama" {
                // Weights of std 0.02 give logits too small to compare.
                p = p.iter().map(|u| u.iter().map(|t| t * 10.0).collect()).collect();
            }
            let x = Tensor::from_slice(&[1i64, 4, 7, 2, 0, 11]).view([1, 6]);
            let full = logits(&spec, &p, &x);
            let half: Vec<Vec<Tensor>> =
                p.iter().map(|u| u.iter().map(|t| t.to_kind(Kind::BFloat16)).collect()).collect();
            let low = logits(&spec, &half, &x).to_kind(Kind::Float);
            let err = (&full - &low).abs().max().double_value(&[]);
            let scale = full.abs().max().double_value(&[]);
            assert!(err > 0.0, "bf16 rounds");
            assert!(err < 0.05 * scale, "{}: bf16 logits within 5% of f32: {err} vs {scale}", spec.kind());
        }
    }

    #[test]
    fn a_llama_init_fills_its_layout_with_norms_at_one() {
        let spec = tiny_llama(16, 4, 10);
        let (layout, a) = initial_weights(&spec, 5);
        assert_eq!(a.len(), layout.total);
        let at = |name: &str| layout.names.iter().position(|n| n == name).unwrap();
        let norm = at("model.layers.1.post_attention_layernorm.weight");
        let off = layout.offsets[norm];
        assert!(a[off..off + 16].iter().all(|v| *v == 1.0));
        assert_eq!(layout.shapes[at("model.layers.0.self_attn.k_proj.weight")], vec![8, 16], "2 kv heads of 4");
    }

    #[test]
    fn mlp_loss_sum_is_batch_size_times_mean() {
        let spec = ModelSpec::Mlp(MlpSpec { layers: vec![3, 4, 2] });
        let p = params(&spec, 0);
        let x = Tensor::from_slice(&[0.1f32, 0.2, 0.3, -1.0, 0.5, 2.0]).view([2, 3]);
        let y = Tensor::from_slice(&[0i64, 1]);
        let loss = |x: &Tensor, y: &Tensor| loss_sum(&spec, &logits(&spec, &p, x), y).double_value(&[]);
        let sum = loss(&x, &y);
        let one = loss(&x.narrow(0, 0, 1), &y.narrow(0, 0, 1));
        let two = loss(&x.narrow(0, 1, 1), &y.narrow(0, 1, 1));
        assert!((sum - (one + two)).abs() < 1e-5);
    }
}
