"""The SDK against a real coordinator and workers (started by
tests/python_sdk.rs, which passes FLOTILLA_COORDINATOR, FLOTILLA_TOKEN,
FLOTILLA_TLS_DIR and FLOTILLA_TEST_DIR), run with pytest."""

import os

import pytest

from flotilla import Client, FlotillaError

JOB = {
    "name": "sdk",
    "model": {"kind": "mlp", "layers": [4, 8, 2]},
    "data": {"kind": "synthetic", "seed": 1, "samples": 64},
    "train": {"steps": 12, "global_batch": 8, "seed": 1, "optimizer": {"lr": 0.01}},
    "workers": {"min": 1, "max": 1},
    "checkpoint": {"url": "runs", "every": 3, "keep": 2},
}

WAITING_YAML = """
name: sdk-waits
model: {kind: mlp, layers: [4, 8, 2]}
data: {kind: synthetic, seed: 1, samples: 64}
train: {steps: 10, global_batch: 8, seed: 1}
workers: {min: 1, max: 1}
"""


@pytest.fixture
def c() -> Client:
    return Client()


@pytest.fixture
def test_dir() -> str:
    return os.environ["FLOTILLA_TEST_DIR"]


def test_submit_with_overrides_wait_metrics_checkpoints(c: Client, test_dir: str) -> None:
    job = c.submit(JOB, {"train.steps": 6}, base_dir=test_dir, **{"train.optimizer.lr": 0.02})
    final = job.wait(progress=False)
    assert final["phase"] == "succeeded", final
    assert (final["step"], final["total_steps"]) == (6, 6), final
    points = job.metrics(as_frame=False)
    assert points and points[-1]["step"] == 6, points
    assert all(p["lr"] <= 0.02 for p in points), points
    steps = [ck["step"] for ck in job.checkpoints()]
    assert steps and all(s % 3 == 0 for s in steps), steps
    assert job.registration() is None
    files = {f["name"]: f["bytes"] for f in job.model_files()}
    assert "model.safetensors" in files, files
    folder = job.download_model(os.path.join(test_dir, "downloaded"))
    for name, size in files.items():
        assert (folder / name).stat().st_size == size, name
    assert job.generations()[0]["world_size"] == 1
    assert job.id in [j.id for j in c.jobs()]


def test_a_yaml_job_with_overrides_and_cancel(c: Client, test_dir: str) -> None:
    # min 8 workers: it waits (the test runs four), until cancelled.
    job = c.submit(WAITING_YAML, {"workers.min": 8, "workers.max": 8}, base_dir=test_dir)
    status = job.status()
    assert (status["phase"], status["min_workers"]) == ("pending", 8), status
    assert job.cancel()["phase"] == "cancelled"
    assert job.wait(progress=False)["phase"] == "cancelled"


def test_errors_carry_the_api_code(c: Client) -> None:
    with pytest.raises(FlotillaError) as e:
        c.job("nope-1").status()
    assert (e.value.code, e.value.status) == ("not_found", 404), e.value
    with pytest.raises(FlotillaError) as e:
        c.submit({"name": "bad", "bogus_field": 1}, base_dir="/")
    assert e.value.code == "invalid_argument" and "bogus_field" in e.value.message, e.value
    with pytest.raises(FlotillaError) as e:
        Client(token="flt_" + "0" * 64).jobs()
    assert (e.value.code, e.value.status) == ("unauthenticated", 401), e.value
