#!/usr/bin/env python3
"""The torchrun side of `cargo bench --bench recovery`.

One rank of a GPT trained with DistributedDataParallel on gloo, meant to run
under `torchrun --max-restarts N --rdzv-backend c10d`: it saves model,
optimizer and step with torch.save every `--every` steps (rank 0, written to a
temporary file and renamed) and resumes from that file when torchrun restarts
the worker group. The model is the oracle's GPT (scripts/oracle/reference.py);
the data are windows of the same token file flotilla trains on, in an order
drawn from the step and rank (resumable, not flotilla's sampler).

Each rank writes its pid to OUT/pid-RANK when it starts. Rank 0 appends one
JSON line per completed step to OUT/steps.jsonl: step, wall-clock time_ms,
torchrun's restart count and the step it resumed from.

    torchrun ... recovery_baseline.py --out OUT --tokens FILE --steps N --every K \\
        --layers L --d-model D --heads H --context C --vocab V --global-batch B --micro-batch M
"""

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "oracle"))
from reference import Gpt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--every", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--d-model", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--context", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--global-batch", type=int, required=True)
    ap.add_argument("--micro-batch", type=int, required=True)
    args = ap.parse_args()

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    with open(os.path.join(args.out, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    # What `init_process_group("gloo")` does under torchrun, with the keys of
    # each restart under a prefix of their own: without one, a restarted
    # group read the previous group's addresses from torchrun's store
    # ("Gloo connectFullMesh failed ... Connection refused") or hung.
    host = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=host,
                          timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=dist.PrefixStore(f"restart-{restart}/", store), rank=rank,
                            world_size=world)

    raw = np.fromfile(args.tokens, dtype="<u2").astype(np.int64)
    tokens = torch.from_numpy(raw)
    count = (tokens.numel() - 1) // args.context
    windows = tokens.as_strided((count, args.context + 1), (args.context, 1))

    torch.manual_seed(1)
    cfg = {"layers": args.layers, "d_model": args.d_model, "heads": args.heads,
           "context": args.context, "vocab": args.vocab}
    model = Gpt(cfg)
    net = nn.parallel.DistributedDataParallel(model)
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3)

    ckpt = os.path.join(args.out, "checkpoint.pt")
    start = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        adam.load_state_dict(state["optimizer"])
        start = state["step"]
    log = open(os.path.join(args.out, "steps.jsonl"), "a") if rank == 0 else None

    local = args.global_batch // world
    micro = max(min(args.micro_batch, local), 1)
    for step in range(start, args.steps):
        adam.zero_grad(set_to_none=False)
        g = torch.Generator().manual_seed(step * 1000 + rank)
        idx = torch.randint(0, count, (local,), generator=g)
        chunks = idx.split(micro)
        for c, chunk in enumerate(chunks):
            win = windows[chunk]
            x, y = win[:, : args.context], win[:, 1:]
            if c + 1 < len(chunks):
                with net.no_sync():
                    (net(x, y) / args.global_batch).backward()
            else:
                (net(x, y) / args.global_batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        adam.step()
        done = step + 1
        if log is not None:
            line = {"step": done, "time_ms": int(time.time() * 1000), "restart": restart, "resumed_from": start}
            log.write(json.dumps(line) + "\n")
            log.flush()
        if done % args.every == 0 and rank == 0:
            tmp = ckpt + ".tmp"
            torch.save({"model": model.state_dict(), "optimizer": adam.state_dict(), "step": done}, tmp)
            os.replace(tmp, ckpt)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
