"""A learning-rate sweep over the quickstart job with the Python SDK: every
variant submitted at once (they queue for workers), each followed to its
end, then ranked by final training loss.

    pip install ./python
    flotilla coordinator & flotilla worker & flotilla worker &
    export FLOTILLA_TOKEN_FILE=$PWD/flotilla-coordinator/admin.token
    export FLOTILLA_TLS_DIR=$PWD/flotilla-coordinator/tls
    python examples/sweep.py --coordinator https://127.0.0.1:7070
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
    args = parser.parse_args()

    client = Client(args.coordinator)
    jobs = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        overrides = {"name": f"sweep-lr{round(lr * 1e4)}", "train.optimizer.lr": lr}
        if args.steps:
            overrides["train.steps"] = args.steps
            overrides["train.schedule.warmup_steps"] = min(20, args.steps // 2)
            overrides["checkpoint.every"] = 0
        jobs.append((lr, client.submit(QUICKSTART, overrides)))
        print(f"submitted lr={lr} as {jobs[-1][1].id}", flush=True)

    results = []
    for lr, job in jobs:
        final = job.wait(progress=True)
        points = job.metrics(as_frame=False)
        loss = points[-1]["loss"] if points else float("nan")
        results.append((loss, lr, job.id, final["phase"]))
    print("rank  lr        final loss  job")
    for rank, (loss, lr, job_id, phase) in enumerate(sorted(results), start=1):
        print(f"{rank:>4}  {lr:<8g}  {loss:<10.4f}  {job_id} ({phase})")


if __name__ == "__main__":
    main()
