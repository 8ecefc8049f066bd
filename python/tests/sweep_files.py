"""The sweep tests' base job and grid, shared with tests/sweeps.rs
(tests/fixtures/sweep)."""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "sweep"
JOB = (FIXTURES / "job.yaml").read_text()
GRID = (FIXTURES / "grid.yaml").read_text()
