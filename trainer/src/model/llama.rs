//! The Llama family (transformers' `LlamaForCausalLM`): RMSNorm, rotary
//! position embeddings (optionally with Llama 3's frequency scaling), a
//! SwiGLU MLP and grouped-query attention, without biases. Parameters carry
//! transformers' names, so that a Hugging Face `model.safetensors` maps onto
//! the layout one to one. Units: the embedding, one per decoder layer, the
//! head (final norm and output projection).
//!
//! Precision follows the GPT's: matrix products and attention in the
//! parameters' dtype; RMSNorm, the rotary tables and softmax's
//! accumulation in f32.

use flotilla_jobspec::LlamaSpec;
use tch::{Kind, Tensor};

use super::Unit;

/// A decoder layer's tensors, after `model.layers.N.`, in [`forward`]'s order.
const LAYER_TENSORS: [&str; 9] = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

pub const EMBEDDING: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// The units and their tensors' names, in order.
pub fn units(l: &LlamaSpec) -> Vec<(Unit, Vec<String>)> {
    let mut out = vec![(Unit::Embedding, vec![EMBEDDING.to_string()])];
    for i in 0..l.layers {
        out.push((Unit::Block(i), LAYER_TENSORS.iter().map(|n| format!("model.layers.{i}.{n}")).collect()));
    }
    out.push((Unit::Head, vec![FINAL_NORM.to_string(), LM_HEAD.to_string()]));
    out
}

/// Every tensor's shape, in unit order.
pub fn shapes(l: &LlamaSpec) -> Vec<(String, Vec<usize>)> {
    let (d, f, v) = (l.d_model, l.ffn, l.vocab);
    let kv = kv_width(l);
    let layer: [Vec<usize>; 9] =
        [vec![d], vec![d, d], vec![kv, d], vec![kv, d], vec![d, d], vec![d], vec![f, d], vec![f, d], vec![d, f]];
    let mut out = vec![(EMBEDDING.to_string(), vec![v, d])];
    for i in 0..l.layers {
        for (n, s) in LAYER_TENSORS.iter().zip(layer.iter()) {
            out.push((format!("model.layers.{i}.{n}"), s.clone()));
        }
    }
    out.push((FINAL_NORM.to_string(), vec![d]));
    out.push((LM_HEAD.to_string(), vec![v, d]));
    out
}

fn kv_width(l: &LlamaSpec) -> usize {
    l.d_model / l.heads * l.kv_heads
}

/// With tied embeddings the head's output projection is the token
/// embedding. The engine keeps two copies, the embedding unit's and the
/// head's, that start equal and get the same (summed) gradient every step
/// (`engine::tied`), so that pipelines can put them on different stages.
pub fn tied(l: &LlamaSpec) -> bool {
    l.tie_embeddings
}

/// Draws one unit's initial parameters, in its tensors' order, from the
/// global torch generator (transformers' init: normal with std 0.02 for
/// projections and embeddings, ones for the norms). With tied embeddings
/// the head's projection is a copy of `embedding` (the embedding unit's
/// draw), and nothing is drawn for it.
pub fn init_unit(l: &LlamaSpec, unit: Unit, embedding: Option<&Tensor>) -> Vec<Tensor> {
    let all = shapes(l);
    let (_, names) = units(l).into_iter().find(|(u, _)| *u == unit).expect("a unit of this model");
    names
        .iter()
        .map(|name| {
            let (_, shape) = all.iter().find(|(n, _)| n == name).expect("every tensor has a shape");
            let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            let opts = (Kind::Float, tch::Device::Cpu);
            if name.ends_with("norm.weight") {
                Tensor::ones(shape.as_slice(), opts)
            } else if let (true, LM_HEAD, Some(e)) = (tied(l), name.as_str(), embedding) {
                e.view(shape.as_slice()).copy()
            } else {
                Tensor::randn(shape.as_slice(), opts) * 0.02
            }
        })
        .collect()
}

/// RMSNorm in f32 whatever the activations' dtype, rounded back to it.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let h = x.to_kind(Kind::Float);
    let var = h.square().mean_dim(-1, true, Kind::Float);
    (w.to_kind(Kind::Float) * (h * (var + eps).rsqrt())).to_kind(kind)
}

/// The rotary inverse frequencies (f32), with Llama 3's scaling applied
/// when the model has it.
fn inv_freq(l: &LlamaSpec, head_dim: i64) -> Tensor {
    let idx = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, tch::Device::Cpu)).to_kind(Kind::Float);
    let inv = Tensor::pow_scalar(l.rope_theta, &(idx / head_dim as f64)).reciprocal();
    let Some(s) = &l.rope_scaling else { return inv };
    let old = s.original_max_positions as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
    let scaled = inv.where_self(&wavelen.le(low_wavelen), &(&inv / s.factor));
    let smooth = (wavelen.reciprocal() * old - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
    let smoothed = (smooth.ones_like() - &smooth) * &scaled / s.factor + &smooth * &scaled;
    let medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
    smoothed.where_self(&medium, &scaled)
}

/// `(cos, sin)` for positions `0..t`, `[t, head_dim]`, in f32.
fn rotary(l: &LlamaSpec, t: i64, head_dim: i64, device: tch::Device) -> (Tensor, Tensor) {
    let pos = Tensor::arange(t, (Kind::Float, tch::Device::Cpu));
    let freqs = pos.unsqueeze(1).matmul(&inv_freq(l, head_dim).unsqueeze(0));
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos().to_device(device), emb.sin().to_device(device))
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], -1)
}

/// Applies the rotation to `[b, heads, t, hd]`, in f32, rounded back.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    (&xf * cos + rotate_half(&xf) * sin).to_kind(kind)
}

/// Runs one unit (see `model::forward`).
pub fn forward(l: &LlamaSpec, unit: Unit, p: &[Tensor], x: &Tensor) -> Tensor {
    let eps = l.norm_eps;
    match unit {
        Unit::Embedding => Tensor::embedding(&p[0], x, -1, false, false),
        Unit::Block(_) => {
            let (b, t, d) = x.size3().expect("activations are [batch, time, d_model]");
            let (h, kvh) = (l.heads as i64, l.kv_heads as i64);
            let hd = d / h;
            let a = rms_norm(x, &p[0], eps);
            let split = |z: Tensor, n: i64| z.view([b, t, n, hd]).transpose(1, 2);
            let (cos, sin) = rotary(l, t, hd, x.device());
            let q = rope(&split(a.linear::<Tensor>(&p[1], None), h), &cos, &sin);
            let k = rope(&split(a.linear::<Tensor>(&p[2], None), kvh), &cos, &sin);
            let v = split(a.linear::<Tensor>(&p[3], None), kvh);
            // Each key/value head serves `h / kvh` consecutive query heads.
            let (k, v) =
                (k.repeat_interleave_self_int(h / kvh, 1, None), v.repeat_interleave_self_int(h / kvh, 1, None));
            let y = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, false);
            let hs = x + y.transpose(1, 2).contiguous().view([b, t, d]).linear::<Tensor>(&p[4], None);
            let m = rms_norm(&hs, &p[5], eps);
            let gate = m.linear::<Tensor>(&p[6], None).silu();
            let up = m.linear::<Tensor>(&p[7], None);
            &hs + (gate * up).linear::<Tensor>(&p[8], None)
        }
        Unit::Head => rms_norm(x, &p[0], eps).linear::<Tensor>(&p[1], None),
        Unit::Linear { .. } => unreachable!("a Llama has no linear units"),
    }
}
