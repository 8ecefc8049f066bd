//! The models a job file can name: an MLP classifier and a decoder-only
//! transformer (GPT). Each returns the *sum* of its per-sample losses, so
//! that gradients add up across micro-batches and ranks into the gradient of
//! the global batch's mean loss.

use flotilla_jobspec::{GptSpec, ModelSpec};
use tch::nn;
use tch::{Kind, Reduction, Tensor};

use crate::checkpoint::Layout;

pub struct Model {
    vs: nn::VarStore,
    spec: ModelSpec,
    /// The units in order, and each unit's parameters in the unit's order.
    units: Vec<Unit>,
    unit_params: Vec<Vec<Tensor>>,
}

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
                    let names = [
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
                    ]
                    .iter()
                    .map(|n| format!("blocks.{i}.{n}"))
                    .collect();
                    out.push((Unit::Block(i), names));
                }
                out.push((Unit::Head, vec!["ln_f.weight".into(), "ln_f.bias".into(), "head.weight".into()]));
                out
            }
        }
    }
}

/// The activation unit `unit` produces for `batch` samples, as a shape.
pub fn output_shape(spec: &ModelSpec, unit: Unit, batch: usize) -> Vec<i64> {
    match (spec, unit) {
        (ModelSpec::Mlp(m), Unit::Linear { index, .. }) => vec![batch as i64, m.layers[index + 1] as i64],
        (ModelSpec::Gpt(g), Unit::Head) => vec![batch as i64, g.context as i64, g.vocab as i64],
        (ModelSpec::Gpt(g), _) => vec![batch as i64, g.context as i64, g.d_model as i64],
        (ModelSpec::Mlp(_), _) => unreachable!("an MLP has only linear units"),
    }
}

fn gpt_init(p: &nn::Path, spec: &GptSpec) {
    let d = spec.d_model as i64;
    let normal = nn::Init::Randn { mean: 0.0, stdev: 0.02 };
    let linear = |p: nn::Path, i: usize, o: usize, bias: bool| {
        let cfg = nn::LinearConfig { ws_init: normal, bs_init: Some(nn::Init::Const(0.0)), bias };
        nn::linear(p, i as i64, o as i64, cfg);
    };
    let emb = nn::EmbeddingConfig { ws_init: normal, ..Default::default() };
    nn::embedding(p / "wte", spec.vocab as i64, d, emb);
    let _ = p.var("wpe", &[spec.context as i64, d], normal);
    for i in 0..spec.layers {
        let b = p / "blocks" / i;
        nn::layer_norm(&b / "ln1", vec![d], Default::default());
        linear(&b / "attn" / "qkv", spec.d_model, 3 * spec.d_model, true);
        linear(&b / "attn" / "proj", spec.d_model, spec.d_model, true);
        nn::layer_norm(&b / "ln2", vec![d], Default::default());
        linear(&b / "mlp" / "fc", spec.d_model, 4 * spec.d_model, true);
        linear(&b / "mlp" / "proj", 4 * spec.d_model, spec.d_model, true);
    }
    nn::layer_norm(p / "ln_f", vec![d], Default::default());
    linear(p / "head", spec.d_model, spec.vocab, false);
}

const LN_EPS: f64 = 1e-5;

/// Runs one unit on `x` with its parameters `p` (in [`Unit::all`]'s
/// order): the features or token ids for the first unit, the previous
/// unit's output otherwise.
pub fn forward(spec: &ModelSpec, unit: Unit, p: &[Tensor], x: &Tensor) -> Tensor {
    match (spec, unit) {
        (_, Unit::Linear { relu, .. }) => {
            let h = x.linear(&p[0], Some(&p[1]));
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
            let ln = |z: &Tensor, w: &Tensor, bias: &Tensor| z.layer_norm([d], Some(w), Some(bias), LN_EPS, true);
            let mask = Tensor::ones([t, t], (Kind::Bool, x.device())).triu(1);
            let a = ln(x, &p[0], &p[1]);
            let qkv = a.linear(&p[2], Some(&p[3])).split(d, 2);
            let heads = |z: &Tensor| z.view([b, t, h_count, hd]).transpose(1, 2);
            let (q, k, v) = (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]));
            let att = (q.matmul(&k.transpose(-2, -1)) * (1.0 / (hd as f64).sqrt()))
                .masked_fill(&mask, f64::NEG_INFINITY)
                .softmax(-1, Kind::Float);
            let y = att.matmul(&v).transpose(1, 2).contiguous().view([b, t, d]);
            let h = x + y.linear(&p[4], Some(&p[5]));
            let m = ln(&h, &p[6], &p[7]).linear(&p[8], Some(&p[9])).gelu("none").linear(&p[10], Some(&p[11]));
            h + m
        }
        (ModelSpec::Gpt(g), Unit::Head) => {
            let d = g.d_model as i64;
            x.layer_norm([d], Some(&p[0]), Some(&p[1]), LN_EPS, true).linear::<Tensor>(&p[2], None)
        }
        (ModelSpec::Mlp(_), _) => unreachable!("an MLP has only linear units"),
    }
}

/// Sum over the batch of each sample's loss, from the last unit's output
/// (cross-entropy; for the GPT the mean over the sample's positions).
pub fn loss_sum(spec: &ModelSpec, out: &Tensor, y: &Tensor) -> Tensor {
    match spec {
        ModelSpec::Mlp(_) => out.cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0),
        ModelSpec::Gpt(g) => {
            let t = y.size()[1];
            let flat = out.view([-1, g.vocab as i64]);
            flat.cross_entropy_loss::<Tensor>(&y.reshape([-1]), None, Reduction::Sum, -100, 0.0) / (t as f64)
        }
    }
}

impl Model {
    /// Builds the model with weights drawn from `seed`: the same seed gives
    /// bit-identical weights on every rank.
    pub fn build(spec: &ModelSpec, seed: u64) -> Model {
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let root = vs.root();
        match spec {
            ModelSpec::Mlp(m) => {
                for (i, w) in m.layers.windows(2).enumerate() {
                    nn::linear(&root / "layers" / i, w[0] as i64, w[1] as i64, Default::default());
                }
            }
            ModelSpec::Gpt(g) => gpt_init(&root, g),
        }
        let vars = vs.variables();
        let (units, unit_params) = Unit::all(spec)
            .into_iter()
            .map(|(unit, names)| (unit, names.iter().map(|n| vars[n].shallow_clone()).collect()))
            .unzip();
        Model { vs, spec: spec.clone(), units, unit_params }
    }

    /// Sum over the batch of each sample's loss: every unit in turn.
    pub fn loss_sum(&self, x: &Tensor, y: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for (unit, p) in self.units.iter().zip(&self.unit_params) {
            h = forward(&self.spec, *unit, p, &h);
        }
        loss_sum(&self.spec, &h, y)
    }

    /// Trainable tensors by name, in name order (the order of flat buffers).
    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The parameters' layout (names, shapes, offsets) and their values as
    /// one flat buffer in that layout: what checkpoints and collectives use.
    pub fn flat(&self) -> (Layout, Vec<f32>) {
        flat_of(&self.params())
    }

    /// [`Model::flat`] with the tensors in unit order ([`Unit::all`]), so
    /// that each unit's parameters are one contiguous range.
    pub fn flat_by_unit(&self) -> (Layout, Vec<f32>) {
        let vars = self.vs.variables();
        let named: Vec<(String, Tensor)> = Unit::all(&self.spec)
            .into_iter()
            .flat_map(|(_, names)| names)
            .map(|n| {
                let t = vars[&n].shallow_clone();
                (n, t)
            })
            .collect();
        flat_of(&named)
    }
}

fn flat_of(named: &[(String, Tensor)]) -> (Layout, Vec<f32>) {
    let layout =
        Layout::new(named.iter().map(|(n, t)| (n.clone(), t.size().iter().map(|d| *d as usize).collect())).collect());
    let mut flat = vec![0f32; layout.total];
    for (i, (_, t)) in named.iter().enumerate() {
        let off = layout.offsets[i];
        let n = t.numel();
        t.contiguous().view([-1]).copy_data(&mut flat[off..off + n], n);
    }
    (layout, flat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_jobspec::MlpSpec;

    #[test]
    fn same_seed_gives_bit_identical_weights() {
        let spec = ModelSpec::Gpt(GptSpec { layers: 1, d_model: 8, heads: 2, context: 4, vocab: 10 });
        let (a, b) = (Model::build(&spec, 5), Model::build(&spec, 5));
        for ((na, ta), (nb, tb)) in a.params().iter().zip(b.params().iter()) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{na} differs");
        }
        let names: Vec<String> = a.params().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"blocks.0.attn.qkv.weight".to_string()), "{names:?}");
    }

    #[test]
    fn gpt_is_causal() {
        let spec = GptSpec { layers: 2, d_model: 8, heads: 2, context: 5, vocab: 10 };
        let spec = ModelSpec::Gpt(spec);
        let m = Model::build(&spec, 1);
        let logits = |x: &Tensor| {
            let mut h = x.shallow_clone();
            for ((unit, _), p) in Unit::all(&spec).into_iter().zip(&m.unit_params) {
                h = forward(&spec, unit, p, &h);
            }
            h
        };
        let a = Tensor::from_slice(&[1i64, 2, 3, 4, 5]).view([1, 5]);
        let b = Tensor::from_slice(&[1i64, 2, 3, 9, 9]).view([1, 5]);
        let (la, lb) = (logits(&a), logits(&b));
        assert!(la.narrow(1, 0, 3).allclose(&lb.narrow(1, 0, 3), 1e-6, 1e-6, false), "future tokens leaked");
        assert!(!la.narrow(1, 3, 1).allclose(&lb.narrow(1, 3, 1), 1e-6, 1e-6, false));
    }

    #[test]
    fn mlp_loss_sum_is_batch_size_times_mean() {
        let m = Model::build(&ModelSpec::Mlp(MlpSpec { layers: vec![3, 4, 2] }), 0);
        let x = Tensor::from_slice(&[0.1f32, 0.2, 0.3, -1.0, 0.5, 2.0]).view([2, 3]);
        let y = Tensor::from_slice(&[0i64, 1]);
        let sum = m.loss_sum(&x, &y).double_value(&[]);
        let one = m.loss_sum(&x.narrow(0, 0, 1), &y.narrow(0, 0, 1)).double_value(&[]);
        let two = m.loss_sum(&x.narrow(0, 1, 1), &y.narrow(0, 1, 1)).double_value(&[]);
        assert!((sum - (one + two)).abs() < 1e-5);
    }
}
