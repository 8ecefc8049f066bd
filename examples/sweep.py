"""A learning-rate sweep over the quickstart job with the Python SDK: the
sweep is kept by the coordinator, which runs its trials (at most
`--parallel` at a time) and ranks them by final training loss.

    pip install ./python
    flotilla coordinator & flotilla worker & flotilla worker &
    export FLOTILLA_TOKEN_FILE=$PWD/flotilla-coordinator/admin.token
    export FLOTILLA_TLS_DIR=$PWD/flotilla-coordinator/tls
    python examples/sweep.py --coordinator https://127.0.0.1:7070

The same sweep as a file is `flotilla sweep SWEEP.yaml` (docs/sweeps.md).
"""

import argparse
from pathlib import Path

from flotilla import Client

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description="A learning-rate sweep over the quickstart job.")
    parser.add_argument("--coordinator", default=None, help="default: $FLOTILLA_COORDINATOR")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead of the file's")
    parser.add_argument("--lrs", default="0.0003,0.001,0.003,0.01", help="comma-separated learning rates")
    parser.add_argument("--parallel", type=int, default=2, help="trials running at once")
    args = parser.parse_args()

    parameters = {"train.optimizer.lr": {"values": [float(x) for x in args.lrs.split(",")]}}
    if args.steps:
        parameters["train.steps"] = {"values": [args.steps]}
        parameters["train.schedule.warmup_steps"] = {"values": [min(20, args.steps // 2)]}
        parameters["checkpoint.every"] = {"values": [0]}
    client = Client(args.coordinator)
    sweep = client.sweep(
        {"name": "lr-sweep", "parameters": parameters, "max_parallel": args.parallel,
         "metric": {"name": "loss", "goal": "minimize"}},
        job=QUICKSTART,
    )
    print(f"submitted sweep {sweep.id}", flush=True)
    final = sweep.wait(progress=True)
    print(f"sweep {sweep.id}: {final['state']}")
    print("rank  lr        final loss  job")
    for t in final["trials"]:
        rank = t["rank"] or "-"
        loss = "-" if t["metric"] is None else f"{t['metric']:.4f}"
        lr = t["params"]["train.optimizer.lr"]
        print(f"{rank:>4}  {lr:<8g}  {loss:<10}  {t['job_id']} ({t['state']})")


if __name__ == "__main__":
    main()
