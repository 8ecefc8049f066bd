"""Sweeps through the SDK against a real coordinator and four workers
(started by tests/python_sdk.rs): a grid runs at most `max_parallel` trials
at a time and ranks them; the median rule stops a trial that cannot learn."""

import os
import time
from pathlib import Path

import pytest

from flotilla import Client, FlotillaError
from sweep_files import GRID, JOB

ACTIVE = ("queued", "running")


@pytest.fixture
def c() -> Client:
    return Client()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "job.yaml").write_text(JOB)
    (tmp_path / "grid.yaml").write_text(GRID)
    return tmp_path


def follow(sweep, seen: list) -> dict:
    """Polls the sweep to its end, noting each snapshot's trials."""
    while True:
        status = sweep.status()
        seen.append(status["trials"])
        if status["state"] != "running":
            return status
        time.sleep(0.05)


def test_a_grid_sweep_runs_two_trials_at_a_time_and_ranks_them(c: Client, files: Path) -> None:
    sweep = c.sweep(files / "grid.yaml", base_dir=os.environ["FLOTILLA_TEST_DIR"])
    seen: list = []
    final = follow(sweep, seen)
    assert final["state"] == "done", final
    most = max(sum(t["state"] in ACTIVE for t in trials) for trials in seen)
    assert most == 2, f"at most {most} trials at once; max_parallel is 2 and four workers are free"
    board = sweep.leaderboard()
    assert [t["state"] for t in board] == ["succeeded"] * 4, board
    losses = [t["metric"] for t in board]
    assert losses == sorted(losses), board
    assert [t["rank"] for t in board] == [1, 2, 3, 4], board
    assert board[-1]["params"]["train.optimizer.lr"] < 1e-6, board
    assert len({j.id for j in sweep.trials()}) == 4
    assert sweep.id in [s.id for s in c.sweeps()]


def test_a_random_sweep_stops_a_trial_that_cannot_learn(c: Client, files: Path) -> None:
    # Seed 6 draws lr 0.05, then 1e-9: the good trial completes before the
    # poor one starts (one trial at a time), which must then be stopped.
    # (A trial like a completed one is worse than the median half the
    # time: that is the rule, so no such trial runs here.) Long enough that
    # the driver sees the poor one before it ends.
    job = files / "long-job.yaml"
    job.write_text(JOB.replace("steps: 300", "steps: 3000"))
    sweep = c.sweep(
        {
            "name": "random",
            "parameters": {"train.optimizer.lr": {"distribution": "choice", "values": [0.05, 0.000000001]}},
            "trials": 2,
            "seed": 6,
            "max_parallel": 1,
            "early_stopping": {"rule": "median", "warmup_steps": 20},
        },
        job=job,
        base_dir=os.environ["FLOTILLA_TEST_DIR"],
    )
    final = follow(sweep, [])
    assert final["state"] == "done", final
    by_trial = sorted(final["trials"], key=lambda t: t["trial"])
    lrs = [t["params"]["train.optimizer.lr"] for t in by_trial]
    assert lrs[0] == 0.05 and lrs[1] < 1e-6, lrs
    assert [t["state"] for t in by_trial] == ["succeeded", "stopped"], [(t["state"], t["message"]) for t in by_trial]
    poor = by_trial[1]
    assert "median rule" in poor["message"] and poor["step"] < 3000, poor
    job = c.job(poor["job_id"]).status()
    assert job["phase"] == "cancelled" and "median rule" in job["message"], job


def test_cancelling_a_sweep_cancels_its_trials(c: Client, files: Path) -> None:
    long = files / "long.yaml"
    long.write_text(JOB.replace("steps: 300", "steps: 100000"))
    sweep = c.sweep({"name": "cancelled", "job": "long.yaml", "parameters": {"train.seed": {"values": [1, 2, 3]}},
                     "max_parallel": 2}, job=long, base_dir=os.environ["FLOTILLA_TEST_DIR"])
    while not any(t["state"] in ACTIVE for t in sweep.status()["trials"]):
        time.sleep(0.05)
    after = sweep.cancel()
    assert after["state"] == "cancelled", after
    started = [t for t in after["trials"] if t["job_id"]]
    assert started and all(t["state"] == "cancelled" for t in started), after
    assert sum(1 for t in after["trials"] if not t["job_id"]) >= 1, "max_parallel 2 of 3: one never started"


def test_a_bad_trial_rejects_the_sweep(c: Client, files: Path) -> None:
    with pytest.raises(FlotillaError) as e:
        c.sweep({"name": "bad", "parameters": {"train.global_batch": {"values": [16, 0]}}}, job=files / "job.yaml")
    assert e.value.code == "invalid_argument" and "trial 1" in e.value.message, e.value
    assert "train.global_batch" in e.value.message, e.value
