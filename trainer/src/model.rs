//! The models a job file can name: an MLP classifier and a decoder-only
//! transformer (GPT). Each returns the *sum* of its per-sample losses, so
//! that gradients add up across micro-batches and ranks into the gradient of
//! the global batch's mean loss.

use flotilla_jobspec::{GptSpec, ModelSpec};
use tch::nn::{self, Module};
use tch::{Kind, Reduction, Tensor};

use crate::checkpoint::Layout;

pub struct Model {
    vs: nn::VarStore,
    net: Net,
}

enum Net {
    Mlp(Vec<nn::Linear>),
    Gpt(Gpt),
}

struct Block {
    ln1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    ln2: nn::LayerNorm,
    fc: nn::Linear,
    fc_proj: nn::Linear,
}

struct Gpt {
    spec: GptSpec,
    wte: nn::Embedding,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    head: nn::Linear,
}

fn gpt_linear(p: nn::Path, i: usize, o: usize, bias: bool) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        bs_init: Some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(p, i as i64, o as i64, cfg)
}

impl Gpt {
    fn new(p: &nn::Path, spec: &GptSpec) -> Gpt {
        let d = spec.d_model as i64;
        let emb = nn::EmbeddingConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 }, ..Default::default() };
        let wte = nn::embedding(p / "wte", spec.vocab as i64, d, emb);
        let wpe = p.var("wpe", &[spec.context as i64, d], nn::Init::Randn { mean: 0.0, stdev: 0.02 });
        let blocks = (0..spec.layers)
            .map(|i| {
                let b = p / "blocks" / i;
                Block {
                    ln1: nn::layer_norm(&b / "ln1", vec![d], Default::default()),
                    qkv: gpt_linear(&b / "attn" / "qkv", spec.d_model, 3 * spec.d_model, true),
                    proj: gpt_linear(&b / "attn" / "proj", spec.d_model, spec.d_model, true),
                    ln2: nn::layer_norm(&b / "ln2", vec![d], Default::default()),
                    fc: gpt_linear(&b / "mlp" / "fc", spec.d_model, 4 * spec.d_model, true),
                    fc_proj: gpt_linear(&b / "mlp" / "proj", 4 * spec.d_model, spec.d_model, true),
                }
            })
            .collect();
        let ln_f = nn::layer_norm(p / "ln_f", vec![d], Default::default());
        let head = gpt_linear(p / "head", spec.d_model, spec.vocab, false);
        Gpt { spec: spec.clone(), wte, wpe, blocks, ln_f, head }
    }

    /// Logits [B, T, vocab] for tokens [B, T].
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, t) = x.size2().expect("tokens are [batch, time]");
        let d = self.spec.d_model as i64;
        let h_count = self.spec.heads as i64;
        let hd = d / h_count;
        let mask = Tensor::ones([t, t], (Kind::Bool, x.device())).triu(1);
        let mut h = self.wte.forward(x) + self.wpe.narrow(0, 0, t);
        for blk in &self.blocks {
            let a = blk.ln1.forward(&h);
            let qkv = blk.qkv.forward(&a).split(d, 2);
            let heads = |z: &Tensor| z.view([b, t, h_count, hd]).transpose(1, 2);
            let (q, k, v) = (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]));
            let att = (q.matmul(&k.transpose(-2, -1)) * (1.0 / (hd as f64).sqrt()))
                .masked_fill(&mask, f64::NEG_INFINITY)
                .softmax(-1, Kind::Float);
            let y = att.matmul(&v).transpose(1, 2).contiguous().view([b, t, d]);
            h = h + blk.proj.forward(&y);
            let m = blk.fc_proj.forward(&blk.fc.forward(&blk.ln2.forward(&h)).gelu("none"));
            h = h + m;
        }
        self.head.forward(&self.ln_f.forward(&h))
    }
}

impl Model {
    /// Builds the model with weights drawn from `seed`: the same seed gives
    /// bit-identical weights on every rank.
    pub fn build(spec: &ModelSpec, seed: u64) -> Model {
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let root = vs.root();
        let net = match spec {
            ModelSpec::Mlp(m) => Net::Mlp(
                m.layers
                    .windows(2)
                    .enumerate()
                    .map(|(i, w)| nn::linear(&root / "layers" / i, w[0] as i64, w[1] as i64, Default::default()))
                    .collect(),
            ),
            ModelSpec::Gpt(g) => Net::Gpt(Gpt::new(&root, g)),
        };
        Model { vs, net }
    }

    /// Sum over the batch of each sample's loss (cross-entropy; for the GPT
    /// the mean over the sample's positions).
    pub fn loss_sum(&self, x: &Tensor, y: &Tensor) -> Tensor {
        match &self.net {
            Net::Mlp(layers) => {
                let mut h = x.shallow_clone();
                for (i, l) in layers.iter().enumerate() {
                    h = l.forward(&h);
                    if i + 1 < layers.len() {
                        h = h.relu();
                    }
                }
                h.cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0)
            }
            Net::Gpt(g) => {
                let logits = g.forward(x);
                let t = x.size()[1];
                let flat = logits.view([-1, g.spec.vocab as i64]);
                flat.cross_entropy_loss::<Tensor>(&y.reshape([-1]), None, Reduction::Sum, -100, 0.0) / (t as f64)
            }
        }
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
        let named = self.params();
        let layout = Layout::new(
            named.iter().map(|(n, t)| (n.clone(), t.size().iter().map(|d| *d as usize).collect())).collect(),
        );
        let mut flat = vec![0f32; layout.total];
        for (i, (_, t)) in named.iter().enumerate() {
            let off = layout.offsets[i];
            let n = t.numel();
            t.contiguous().view([-1]).copy_data(&mut flat[off..off + n], n);
        }
        (layout, flat)
    }
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
        let m = Model::build(&ModelSpec::Gpt(spec.clone()), 1);
        let Net::Gpt(g) = &m.net else { unreachable!() };
        let a = Tensor::from_slice(&[1i64, 2, 3, 4, 5]).view([1, 5]);
        let b = Tensor::from_slice(&[1i64, 2, 3, 9, 9]).view([1, 5]);
        let (la, lb) = (g.forward(&a), g.forward(&b));
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
