"""`kill -9` of the leading coordinator replica during a sweep, through the
SDK. tests/python_sdk.rs starts three replicas and three workers and runs
this file alone, with FLOTILLA_COORDINATOR listing every replica and
FLOTILLA_TEST_REPLICAS their `pid=address` pairs: the surviving replicas
finish the sweep, with no trial lost and none run twice."""

import os
import signal
import time
from pathlib import Path
from typing import Dict

from flotilla import Client
from sweep_files import GRID, JOB

def replica_pids() -> Dict[str, int]:
    """The replicas' processes by address, from FLOTILLA_TEST_REPLICAS."""
    pairs = (p.split("=", 1) for p in os.environ["FLOTILLA_TEST_REPLICAS"].split(","))
    return {addr: int(pid) for pid, addr in pairs}


def leader(c: Client) -> str:
    """The leading replica's address (waits through an election)."""
    while True:
        addr = c.leader()
        if addr is not None:
            return addr
        time.sleep(0.1)


def test_a_leader_kill_mid_sweep_loses_no_trial_and_runs_none_twice(tmp_path: Path) -> None:
    pids = replica_pids()
    c = Client()
    assert sorted(c.urls) == sorted(pids), (c.urls, pids)
    (tmp_path / "job.yaml").write_text(JOB)
    (tmp_path / "grid.yaml").write_text(GRID)
    leader(c)
    sweep = c.sweep(tmp_path / "grid.yaml", base_dir=os.environ["FLOTILLA_TEST_DIR"])

    # Wait on state: the first trials started and two are still to start,
    # so the next leader has trials of its own to start.
    while True:
        states = [t["state"] for t in sweep.status()["trials"]]
        if any(s != "pending" for s in states):
            break
        time.sleep(0.05)
    assert states.count("pending") >= 2, states
    killed = leader(c)
    os.kill(pids[killed], signal.SIGKILL)

    final = sweep.wait(poll=0.2, progress=False)
    now = leader(c)
    assert now != killed, f"{killed} was killed yet leads"
    assert final["state"] == "done", final
    trials = final["trials"]
    assert sorted(t["trial"] for t in trials) == [0, 1, 2, 3], trials
    assert [t["state"] for t in trials] == ["succeeded"] * 4, [(t["state"], t["message"]) for t in trials]
    # One job per trial, and no other job: none was lost, none run twice.
    trial_jobs = [t["job_id"] for t in trials]
    assert all(trial_jobs) and len(set(trial_jobs)) == 4, trials
    listed = [j.id for j in c.jobs()]
    assert len(listed) == len(set(listed)), f"a job listed twice: {listed}"
    assert sorted(listed) == sorted(trial_jobs), (listed, trials)
    assert all(c.job(j).status()["phase"] == "succeeded" for j in listed)
    # Ranked best first by the final loss; the tiny learning rate learns
    # nothing and is last.
    losses = [t["metric"] for t in trials]
    assert None not in losses and losses == sorted(losses), trials
    assert [t["rank"] for t in trials] == [1, 2, 3, 4], trials
    assert trials[-1]["params"]["train.optimizer.lr"] < 1e-6, trials
