"""A repository with a fault-injecting `python` model beside the MLP.

faulty: y = 2x for x FP32 [-1,4]. A row whose x[0] is
  -1  makes the engine raise (every time),
  -2  makes it hang for 3 s (longer than the 0.5 s watchdog),
  -3  makes it raise on the first run of that row's x[1] value and succeed afterwards,
  -4  makes it hang for a minute (as good as forever for a test).
  Loading fails once a file named no-more-loads exists in the model's folder.
broken: loads and warms up, then raises on every input that is not all zeros.
slow_load: faulty, taking 1.5 s to load.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ServerThread, write_config

FAULTY_MODEL = """
import os
import time

class Model:
    def load(self, config):
        if os.path.exists(os.path.join(config["model_dir"], "no-more-loads")):
            raise RuntimeError("loading is broken now (no-more-loads)")
        time.sleep(config["parameters"].get("load_sleep_s", 0))
        self.seen = set()
        self.always_fail = config["parameters"].get("always_fail", False)

    def execute(self, inputs, stream):
        x = inputs["x"]
        if self.always_fail and x.any():  # passes the all-zero warm-up, then breaks
            raise RuntimeError("this engine is broken")
        if (x[:, 0] == -1).any():
            raise RuntimeError("poisoned row (x[0] == -1)")
        if (x[:, 0] == -2).any():
            time.sleep(3)
        if (x[:, 0] == -4).any():
            time.sleep(60)
        for key in x[x[:, 0] == -3, 1].tolist():
            if key not in self.seen:
                self.seen.add(key)
                raise RuntimeError(f"flaky row {key} fails its first run")
        return {"y": x * 2}
"""

IO = {
    "inputs": '[{ name = "x", datatype = "FP32", shape = [-1, 4] }]',
    "outputs": '[{ name = "y", datatype = "FP32", shape = [-1, 4] }]',
}


@pytest.fixture(scope="session")
def fault_repository(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fault-engines")
    shutil.copytree(repository / "mlp", root / "mlp")
    models = {"faulty": {}, "broken": {"always_fail": True}, "slow_load": {"load_sleep_s": 1.5}}
    for name, extra in models.items():
        write_config(
            root / name,
            backend="python",
            max_batch_size=16,
            max_queue_delay_ms=50.0,
            batching="static",
            execution_timeout_ms=500,
            instance_count=1,
            python={"device": "cpu", **IO, **extra},
        )
        (root / name / "model.py").write_text(FAULTY_MODEL)
    return root


@pytest.fixture
def fault_server(
    fault_repository: Path, start_server: Callable[..., ServerThread]
) -> Iterator[Callable[..., ServerThread]]:
    def start(**overrides: Any) -> ServerThread:
        overrides.setdefault("model_repository", fault_repository)
        overrides.setdefault("models", ("faulty", "broken", "mlp"))
        overrides.setdefault("job_retry_base_s", 0.02)
        return start_server(**overrides)

    yield start
