#!/usr/bin/env python3
"""PyTorch reference for flotilla's training (the oracle of issue 4).

Trains the model a flotilla job describes with plain PyTorch: the same
architecture and parameter names (trainer/src/model/), or for a Llama
transformers' LlamaForCausalLM loaded from the job's `model.from`; the
initial weights flotilla exported (`flotilla export-init`, or a Llama
folder's model.safetensors), the same data file, the same
sample order (a port of trainer/src/sampler.rs and rng.rs), micro-batches
accumulated, torch.optim.AdamW, the warmup + cosine schedule and
clip_grad_norm_. With --world 2 or more it runs DistributedDataParallel on
gloo over 127.0.0.1, one process per rank, spawned by this script.

With `train.precision: bf16` it follows flotilla's mixed-precision policy
(trainer/src/model/): the f32 parameters are the masters; each step casts
them to bf16 once, and the forward and backward passes run on those copies:
matrix products, attention scores and activations in bf16, layer norm on
values and affine parameters upcast to f32 (rounded back to bf16), softmax
and the loss in f32. Each micro-batch's bf16 gradients are added into the
masters' f32 gradients; ranks sum those f32 gradients (gloo all-reduce), and
clipping and AdamW run on the f32 masters. Clipping then uses flotilla's
arithmetic (squared norm summed in f64, the coefficient applied only below
1): clip_grad_norm_'s f32 norm differs in the last bits, and casting the
weights to bf16 every step would turn that into differences of 2^-8.

    reference.py --spec SPEC.json --init INIT.safetensors --out LOSSES.jsonl [--world N]

SPEC.json is `flotilla validate --json JOB.yaml`. Rank 0 writes one JSON
line per step: step (1-based), loss, lr, seconds (wall time of the step).
"""

import argparse
import datetime
import json
import math
import os
import socket
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

MASK64 = (1 << 64) - 1
SHUFFLE_STREAM = 0x5348_5546


# --- trainer/src/rng.rs -----------------------------------------------------

class SplitMix64:
    def __init__(self, seed):
        self.state = seed & MASK64

    @classmethod
    def keyed(cls, seed, stream, index):
        g = cls(seed ^ ((stream * 0xD1B5_4A32_D192_ED03) & MASK64))
        # Rust evaluates the right side of `g.0 ^= g.next_u64() ^ ...` first,
        # so the state it XORs into is the one after that draw.
        mixed = g.next_u64() ^ ((index * 0x9E37_79B9_7F4A_7C15) & MASK64)
        g.state ^= mixed
        return g

    def next_u64(self):
        self.state = (self.state + 0x9E37_79B9_7F4A_7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n):
        return (self.next_u64() * n) >> 64


# --- trainer/src/sampler.rs -------------------------------------------------

def permutation(length, seed, epoch):
    p = list(range(length))
    g = SplitMix64.keyed(seed, SHUFFLE_STREAM, epoch)
    for i in range(length - 1, 0, -1):
        j = g.below(i + 1)
        p[i], p[j] = p[j], p[i]
    return p


class Sampler:
    def __init__(self, length, seed, global_batch):
        self.length, self.seed, self.global_batch = length, seed, global_batch
        self.cache = {}

    def index_at(self, pos):
        epoch, k = divmod(pos, self.length)
        if epoch not in self.cache:
            self.cache = {e: p for e, p in self.cache.items() if e + 1 >= epoch}
            self.cache[epoch] = permutation(self.length, self.seed, epoch)
        return self.cache[epoch][k]

    def indices(self, step, rank, world):
        b = self.global_batch
        lo, hi = b * rank // world, b * (rank + 1) // world
        base = step * b
        return [self.index_at(base + p) for p in range(lo, hi)]


# --- trainer/src/optim.rs: learning_rate -------------------------------------

def learning_rate(opt, sched, step, total):
    warmup = sched["warmup_steps"]
    if step < warmup:
        return opt["lr"] * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return sched["min_lr"] + 0.5 * (opt["lr"] - sched["min_lr"]) * (1.0 + math.cos(math.pi * progress))


# --- trainer/src/data.rs ------------------------------------------------------

class Features:
    def __init__(self, path):
        t = load_file(path)
        self.x, self.y = t["x"].to(torch.float32), t["y"].to(torch.int64)

    def __len__(self):
        return self.y.shape[0]

    def batch(self, idx):
        i = torch.tensor(idx, dtype=torch.int64)
        return self.x[i], self.y[i]


class Windows:
    """Sample i is tokens[i*context .. i*context + context + 1] of one shard;
    the windows of shard 0 come first, then those of shard 1, and so on."""

    def __init__(self, shards, context, vocab):
        parts = []
        for tokens in shards:
            if tokens.numel() and int(tokens.max()) >= vocab:
                raise SystemExit(f"a token is outside the model's vocab of {vocab}")
            count = max(tokens.numel() - 1, 0) // context
            parts.append(tokens.as_strided((count, context + 1), (context, 1)))
        self.w = torch.cat(parts)
        self.count = self.w.shape[0]
        self.context = context

    def __len__(self):
        return self.count

    def batch(self, idx):
        win = self.w[torch.tensor(idx, dtype=torch.int64)]
        return win[:, : self.context], win[:, 1:]


def load_data(spec):
    data, model = spec["data"], spec["model"]
    kind = data["kind"]
    if kind == "features":
        return Features(data["path"])
    if kind in ("tokens", "text"):
        dtype = {"u8": "<u1", "u16": "<u2", "u32": "<u4"}[data.get("dtype", "u8") if kind == "tokens" else "u8"]
        paths = data["path"] if isinstance(data["path"], list) else [data["path"]]
        if kind == "tokens" and (any(c in p for p in paths for c in "*?[") or "://" in "".join(paths)):
            raise SystemExit("the reference reads tokens from named local files only (no patterns or URLs)")
        skip = 1024 if data.get("format") == "nanogpt" else 0
        shards = [torch.from_numpy(np.fromfile(p, dtype=dtype, offset=skip).astype(np.int64)) for p in paths]
        return Windows(shards, model["context"], model["vocab"])
    raise SystemExit(f"data.kind {kind!r} is not supported by the reference (use features, tokens or text)")


# --- trainer/src/model/ ---------------------------------------------------------

class Mlp(nn.Module):
    def __init__(self, widths):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x, y):
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i + 1 < len(self.layers):
                h = torch.relu(h)
        return F.cross_entropy(h, y, reduction="sum")


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)


class Ffn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, eps=1e-5)
        self.attn = Attention(d)
        self.ln2 = nn.LayerNorm(d, eps=1e-5)
        self.mlp = Ffn(d)


class Gpt(nn.Module):
    def __init__(self, g):
        super().__init__()
        d, self.heads, self.vocab = g["d_model"], g["heads"], g["vocab"]
        self.d = d
        self.wte = nn.Embedding(g["vocab"], d)
        self.wpe = nn.Parameter(torch.zeros(g["context"], d))
        self.blocks = nn.ModuleList(Block(d) for _ in range(g["layers"]))
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        self.head = nn.Linear(d, g["vocab"], bias=False)

    def forward(self, x, y):
        b, t = x.shape
        d, nh = self.d, self.heads
        hd = d // nh
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        h = self.wte(x) + self.wpe[:t]
        for blk in self.blocks:
            q, k, v = blk.attn.qkv(blk.ln1(h)).split(d, dim=2)
            q, k, v = (z.view(b, t, nh, hd).transpose(1, 2) for z in (q, k, v))
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
            att = att.masked_fill(mask, float("-inf")).softmax(-1)
            y_att = (att @ v).transpose(1, 2).contiguous().view(b, t, d)
            h = h + blk.attn.proj(y_att)
            h = h + blk.mlp.proj(F.gelu(blk.mlp.fc(blk.ln2(h))))
        logits = self.head(self.ln_f(h))
        return F.cross_entropy(logits.view(-1, self.vocab), y.reshape(-1), reduction="sum") / t


# --- bf16: the functional forward of flotilla's policy -------------------------

def ln32(z, w, b):
    """Layer norm in f32 whatever z's dtype, rounded back to it."""
    d = z.shape[-1]
    return F.layer_norm(z.float(), (d,), w.float(), b.float(), 1e-5).to(z.dtype)


def mlp_forward16(p, n_layers, x, y):
    h = x.to(torch.bfloat16)
    for i in range(n_layers):
        h = F.linear(h, p[f"layers.{i}.weight"], p[f"layers.{i}.bias"])
        if i + 1 < n_layers:
            h = torch.relu(h)
    return F.cross_entropy(h.float(), y, reduction="sum")


def gpt_forward16(p, g, x, y):
    b, t = x.shape
    d, nh, vocab = g["d_model"], g["heads"], g["vocab"]
    hd = d // nh
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    h = F.embedding(x, p["wte.weight"]) + p["wpe"][:t]
    for i in range(g["layers"]):
        q = lambda n: p[f"blocks.{i}.{n}"]
        a = ln32(h, q("ln1.weight"), q("ln1.bias"))
        qs, ks, vs = F.linear(a, q("attn.qkv.weight"), q("attn.qkv.bias")).split(d, dim=2)
        qs, ks, vs = (z.view(b, t, nh, hd).transpose(1, 2) for z in (qs, ks, vs))
        att = (qs @ ks.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(mask, float("-inf")).softmax(-1, dtype=torch.float32).to(torch.bfloat16)
        y_att = (att @ vs).transpose(1, 2).contiguous().view(b, t, d)
        h = h + F.linear(y_att, q("attn.proj.weight"), q("attn.proj.bias"))
        m = F.linear(ln32(h, q("ln2.weight"), q("ln2.bias")), q("mlp.fc.weight"), q("mlp.fc.bias"))
        h = h + F.linear(F.gelu(m), q("mlp.proj.weight"), q("mlp.proj.bias"))
    logits = F.linear(ln32(h, p["ln_f.weight"], p["ln_f.bias"]), p["head.weight"])
    return F.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1), reduction="sum") / t


def llama(m):
    """transformers' LlamaForCausalLM from the job's `model.from` folder,
    returning flotilla's loss: per sample, the mean over its positions."""
    from transformers import LlamaForCausalLM

    class Llama(LlamaForCausalLM):
        def forward(self, x, y):
            logits = super().forward(input_ids=x).logits
            vocab = logits.shape[-1]
            return F.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1), reduction="sum") / x.shape[1]

    return Llama.from_pretrained(m["from"], dtype=torch.float32)


def build_model(spec, init_path):
    m = spec["model"]
    if m["kind"] == "llama" and spec["train"].get("precision", "fp32") != "fp32":
        raise SystemExit("the reference trains a llama in fp32 only")
    model = {"mlp": lambda: Mlp(m["layers"]), "gpt": lambda: Gpt(m), "llama": lambda: llama(m)}[m["kind"]]()
    weights = load_file(init_path)
    if m["kind"] == "llama" and model.config.tie_word_embeddings:
        # flotilla keeps the tied matrix in two copies that start equal;
        # the transformers model has one tensor.
        head = weights.pop("lm_head.weight")
        if not torch.equal(head, weights["model.embed_tokens.weight"]):
            raise SystemExit("tied embeddings: the exported lm_head.weight differs from the embedding")
    mine = dict(model.named_parameters())
    if sorted(weights) != sorted(mine):
        raise SystemExit(f"initial weights do not fit the model: file has {sorted(weights)}, model {sorted(mine)}")
    for name, t in weights.items():
        if tuple(t.shape) != tuple(mine[name].shape):
            raise SystemExit(f"{name}: file shape {tuple(t.shape)}, model {tuple(mine[name].shape)}")
    if m["kind"] == "llama" and model.config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict(weights, strict=True)
    return model


# --- the train loop (trainer/src/train.rs) -------------------------------------

def sum_allreduce_hook(_state, bucket):
    """Sum gradients over ranks (flotilla's ring sums; DDP's default averages)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def train(args, rank, world):
    torch.set_num_threads(args.threads)
    spec = json.load(open(args.spec))
    tr = spec["train"]
    opt, sched = tr["optimizer"], tr["schedule"]
    data = load_data(spec)
    model = build_model(spec, args.init)
    named = sorted(model.named_parameters())
    params = [p for _, p in named]
    bf16 = tr.get("precision", "fp32") == "bf16"
    net = model
    if world > 1 and not bf16:
        net = nn.parallel.DistributedDataParallel(model)
        net.register_comm_hook(None, sum_allreduce_hook)
    adam = torch.optim.AdamW(
        params, lr=opt["lr"], betas=(opt["beta1"], opt["beta2"]), eps=opt["eps"],
        weight_decay=opt["weight_decay"], foreach=False,
    )
    sampler = Sampler(len(data), tr["seed"], tr["global_batch"])
    steps, global_batch, micro = tr["steps"], tr["global_batch"], max(tr["micro_batch"], 1)
    out = open(args.out, "w") if rank == 0 else None
    for step in range(steps):
        t0 = time.perf_counter()
        lr = learning_rate(opt, sched, step, steps)
        for g in adam.param_groups:
            g["lr"] = lr
        adam.zero_grad(set_to_none=False)
        idx = sampler.indices(step, rank, world)
        chunks = [idx[i : i + micro] for i in range(0, len(idx), micro)]
        local = 0.0
        if bf16:
            # The step's bf16 copies of the masters, cast once.
            half = {n: p.detach().to(torch.bfloat16) for n, p in named}
            for _, p in named:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        for c, chunk in enumerate(chunks):
            x, y = data.batch(chunk)
            last = c + 1 == len(chunks)
            if bf16:
                leaves = {n: t.clone().requires_grad_() for n, t in half.items()}
                m = spec["model"]
                if m["kind"] == "mlp":
                    loss = mlp_forward16(leaves, len(m["layers"]) - 1, x, y)
                else:
                    loss = gpt_forward16(leaves, m, x, y)
                (loss / global_batch).backward()
                with torch.no_grad():
                    for n, p in named:
                        p.grad += leaves[n].grad.float()
            elif world > 1 and not last:
                with net.no_sync():
                    loss = net(x, y)
                    (loss / global_batch).backward()
            else:
                loss = net(x, y)
                (loss / global_batch).backward()
            local += loss.item()
        if bf16 and world > 1:
            for p in params:
                dist.all_reduce(p.grad)
        total = torch.tensor([local], dtype=torch.float32)
        if world > 1:
            dist.all_reduce(total)
        loss = float(total.item()) / global_batch
        if tr["grad_clip"] is not None:
            if bf16:
                # flotilla's clipping arithmetic: each gradient squared in
                # f32 and summed in f64, the coefficient in f64, applied only
                # below 1. Squaring in f64 instead moves the coefficient's
                # last f32 bit now and then, and the step's bf16 casts turn
                # that into a 2^-8 difference in a weight.
                total = math.sqrt(sum(float(p.grad.square().sum(dtype=torch.float64)) for p in params))
                coef = tr["grad_clip"] / (total + 1e-6)
                if coef < 1.0:
                    for p in params:
                        p.grad.mul_(coef)
            else:
                torch.nn.utils.clip_grad_norm_(params, tr["grad_clip"], foreach=False)
        adam.step()
        seconds = time.perf_counter() - t0
        if out is not None:
            out.write(json.dumps({"step": step + 1, "loss": loss, "lr": lr, "seconds": seconds}) + "\n")
            out.flush()
    if out is not None:
        out.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="the job as JSON: flotilla validate --json JOB.yaml")
    ap.add_argument("--init", required=True, help="initial weights: flotilla export-init JOB.yaml OUT")
    ap.add_argument("--out", required=True, help="per-step losses, JSON lines (written by rank 0)")
    ap.add_argument("--world", type=int, default=1, help="processes (DDP on gloo when > 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (flotilla uses 1)")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--master", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.world == 1:
        train(args, 0, 1)
        return
    if args.rank is None:
        master = f"tcp://127.0.0.1:{free_port()}"
        base = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:]
        procs = [subprocess.Popen(base + ["--rank", str(r), "--master", master]) for r in range(args.world)]
        # A rank that fails leaves its peers blocked in a collective: end them.
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
        codes = [p.returncode for p in procs]
        if any(codes):
            raise SystemExit(f"reference ranks exited with {codes}")
        return
    dist.init_process_group(
        "gloo", init_method=args.master, rank=args.rank, world_size=args.world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        train(args, args.rank, args.world)
        # No rank tears the group down while a peer still uses it.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without running C++ static destructors: at interpreter exit a
    # gloo/store thread left joinable sometimes aborts the process
    # ("terminate called without an active exception") after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
