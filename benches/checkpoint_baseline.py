"""Baselines for benches/checkpoint.rs: torch.save and safetensors of the same
state (parameters and two optimizer moments, f32), timed in this process.
Prints one JSON line: seconds for each and the bytes written."""
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file


def main() -> None:
    numel, out = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    state = {name: torch.randn(numel, generator=g) for name in ("param", "adam.m", "adam.v")}
    result = {}
    for label, save, path in (
        ("torch_save", lambda p: torch.save(state, p), os.path.join(out, "state.pt")),
        ("safetensors", lambda p: save_file(state, p), os.path.join(out, "state.safetensors")),
    ):
        t0 = time.perf_counter()
        save(path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        result[label] = time.perf_counter() - t0
        result[label + "_bytes"] = os.path.getsize(path)
        os.remove(path)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
