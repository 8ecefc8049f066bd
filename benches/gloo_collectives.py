#!/usr/bin/env python3
"""Times torch.distributed collectives on the gloo backend, as the baseline
of benches/collectives.rs (which launches this script in the same run).

    python benches/gloo_collectives.py --world 4 --sizes 1024,1048576 --ops all_reduce,broadcast

Starts `world` processes on 127.0.0.1 and prints one JSON object on stdout:
{"world": 4, "torch": "2.13.0", "results": [{"op": "all_reduce", "bytes": 1024,
"seconds": 1.2e-05, "reps": 200}, ...]}, where seconds is the mean time of one
call on the slowest rank. `bytes` is the whole buffer, as in nccl-tests: the
input of all_reduce, reduce_scatter and broadcast, the output of all_gather.
An op that this torch's gloo cannot run is reported with "seconds": null.
"""

import argparse
import json
import os
import socket
import sys
import time

OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reps_for(nbytes, budget_bytes):
    return max(3, min(200, budget_bytes // max(nbytes, 1)))


def make_call(op, dist, torch, nbytes, world, rank):
    n = nbytes // 4
    if op == "all_reduce":
        t = torch.ones(n)
        return lambda: dist.all_reduce(t)
    if op == "broadcast":
        t = torch.ones(n)
        return lambda: dist.broadcast(t, 0)
    per = n // world
    if op == "reduce_scatter":
        inp, out = torch.ones(per * world), torch.empty(per)
        try:
            dist.reduce_scatter_tensor(out, inp)
            return lambda: dist.reduce_scatter_tensor(out, inp)
        except Exception:
            parts = list(inp.chunk(world))
            dist.reduce_scatter(out, parts)
            return lambda: dist.reduce_scatter(out, parts)
    if op == "all_gather":
        inp, out = torch.ones(per), torch.empty(per * world)
        try:
            dist.all_gather_into_tensor(out, inp)
            return lambda: dist.all_gather_into_tensor(out, inp)
        except Exception:
            parts = list(out.chunk(world))
            dist.all_gather(parts, inp)
            return lambda: dist.all_gather(parts, inp)
    raise ValueError(op)


def worker(rank, world, port, sizes, ops, budget_bytes):
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    results = []
    for op in ops:
        for nbytes in sizes:
            try:
                call = make_call(op, dist, torch, nbytes, world, rank)
                call()  # warm-up (and the fallback probe)
                ok = True
            except Exception as e:  # an op this gloo does not support
                print(f"gloo rank {rank}: {op} {nbytes}: {e}", file=sys.stderr)
                ok = False
            # every rank must agree whether to time it
            flag = torch.tensor([1.0 if ok else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item() < 1.0:
                results.append({"op": op, "bytes": nbytes, "seconds": None, "reps": 0})
                continue
            reps = reps_for(nbytes, budget_bytes)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                call()
            secs = torch.tensor([(time.perf_counter() - t0) / reps])
            dist.all_reduce(secs, op=dist.ReduceOp.MAX)
            results.append({"op": op, "bytes": nbytes, "seconds": secs.item(), "reps": reps})
    if rank == 0:
        print(json.dumps({"world": world, "torch": torch.__version__, "results": results}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sizes", default="1024,1048576", help="buffer sizes in bytes, comma separated")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--budget-bytes", type=int, default=256 << 20,
                   help="bytes per size to aim for (reps = budget / size, 3..200)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    ops = [o for o in args.ops.split(",") if o]
    for op in ops:
        if op not in OPS:
            p.error(f"unknown op {op}")
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    port = free_port()
    mp.start_processes(worker, args=(args.world, port, sizes, ops, args.budget_bytes),
                       nprocs=args.world, start_method="spawn", join=True)


if __name__ == "__main__":
    main()
