#!/usr/bin/env python3
"""transformers' side of flotilla's Llama checks (tests/llama.rs).

    llama_hf.py make --out DIR [--seed N] [--llama3] [--shards] [--tied] [--batch FILE] [--tokens FILE]
        A tiny LlamaForCausalLM (2 layers, d_model 64, 4 heads, 2 kv heads,
        SwiGLU 128, vocab 512) with random weights, saved by save_pretrained
        into DIR (sharded with --shards). --llama3 gives it Llama 3's rope
        scaling and rope_theta 500000; --tied ties its input and output
        embeddings (tie_word_embeddings); --layers, --d-model, --heads,
        --kv-heads, --ffn, --vocab and --context size it otherwise (the
        defaults are the sizes above). --batch writes 4 random sequences of
        17 tokens (`tokens`, i64) there; --tokens writes 20000 random token
        ids as flat little-endian u16 (a `data.kind: tokens` file).

    llama_hf.py logits --model DIR --batch FILE --out FILE
        Loads DIR with AutoModelForCausalLM.from_pretrained, runs it on the
        batch's first 16 positions, writes `logits` to FILE and prints the
        mean next-token loss as JSON.
"""

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def make(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    rope = {"rope_theta": 10000.0}
    if args.llama3:
        rope = {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
            },
        }
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max(64, args.context),
        rms_norm_eps=1e-5, tie_word_embeddings=args.tied, initializer_range=0.05, **rope,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Norm weights away from 1, so that a norm read wrong shows.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(args.out, max_shard_size="300KB" if args.shards else "50GB")
    if args.batch:
        save_file({"tokens": torch.randint(0, args.vocab, (4, 17), dtype=torch.int64)}, args.batch)
    if args.tokens:
        rng = np.random.default_rng(args.seed)
        rng.integers(0, args.vocab, 20000, dtype=np.uint16).astype("<u2").tofile(args.tokens)


def logits(args):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    tokens = load_file(args.batch)["tokens"]
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        out = model(input_ids=x).logits
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    save_file({"logits": out.contiguous()}, args.out)
    print(json.dumps({"loss": loss.item()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--llama3", action="store_true")
    m.add_argument("--shards", action="store_true")
    m.add_argument("--tied", action="store_true")
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--d-model", type=int, default=64)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--ffn", type=int, default=128)
    m.add_argument("--vocab", type=int, default=512)
    m.add_argument("--context", type=int, default=64)
    m.add_argument("--batch")
    m.add_argument("--tokens")
    lg = sub.add_parser("logits")
    lg.add_argument("--model", required=True)
    lg.add_argument("--batch", required=True)
    lg.add_argument("--out", required=True)
    args = ap.parse_args()
    {"make": make, "logits": logits}[args.cmd](args)


if __name__ == "__main__":
    main()
