"""A real tensorgate server on a free loopback port, run on its own event loop in a thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tensorgate.server.app import TensorgateServer
from tensorgate.server.bundled import build
from tensorgate.server.config import ServerConfig

T = TypeVar("T")


class ServerThread:
    """Starts TensorgateServer in a thread; `target` is its 127.0.0.1 address."""

    def __init__(
        self,
        config: ServerConfig,
        tracing: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """loop: the event loop to serve on (a new standard one when not given)."""
        self.config = config
        self.server = TensorgateServer(config, tracing)
        self.loop = loop or asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        self.call(self.server.start())
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        """Runs a coroutine on the server's loop and returns its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout_s)

    def _tasks(self) -> str:
        """The server loop's tasks and where each waits (for a stop that hangs)."""
        import io

        async def dump() -> str:
            out = io.StringIO()
            for task in asyncio.all_tasks():
                print(f"task {task.get_name()}:", file=out)
                awaited: Any = task.get_coro()
                while awaited is not None:  # the chain of awaits, innermost last
                    frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
                    if frame is not None:
                        code = frame.f_code
                        print(f"  {code.co_filename}:{frame.f_lineno} {code.co_name}", file=out)
                    awaited = getattr(awaited, "cr_await", None) or getattr(
                        awaited, "gi_yieldfrom", None
                    )
            return out.getvalue()

        return self.call(dump(), timeout_s=5)

    def stats(self, model: str) -> Any:
        """A snapshot of the model's batcher counters, read on the server's loop."""

        async def read() -> Any:
            from dataclasses import replace

            stats = self.server.models[model].scheduler.stats
            return replace(stats, batch_sizes=stats.batch_sizes.copy())

        return self.call(read())

    def server_calls(self) -> int:
        """Unary calls in a handler plus open streams, as admission counts them."""

        async def read() -> int:
            assert self.server.frontend is not None
            return self.server.frontend.calls

        return self.call(read())

    def queued(self, model: str) -> int:
        """Requests waiting in the model's queue now."""

        async def read() -> int:
            return self.server.models[model].scheduler.queued_requests

        return self.call(read())

    def busy(self, model: str) -> int:
        """The model's instances running a batch now."""

        async def read() -> int:
            return self.server.models[model].scheduler.busy_instances

        return self.call(read())

    def stop(self, grace_s: float = 1.0) -> None:
        if not self._thread.is_alive():
            return  # stopped already (by the test itself)
        try:
            self.call(self.server.stop(grace_s))
        except TimeoutError:
            raise AssertionError("the server did not stop:\n" + self._tasks()) from None
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def write_config(folder: Path, **settings: Any) -> None:
    """Writes folder/config.toml from keyword settings (tables as dicts)."""
    lines, tables = [], []
    for key, value in settings.items():
        if isinstance(value, dict):
            tables.append(f"[{key}]")
            tables += [f"{k} = {_toml(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key} = {_toml(value)}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text("\n".join(lines + tables) + "\n")


_SLEEPY_MODEL = """
import os
import time

class Model:
    def load(self, config):
        self.sleep_s = config["parameters"]["sleep_s"]
        self.gate = config["parameters"].get("gate", "")

    def execute(self, inputs, stream):
        while self.gate and os.path.exists(self.gate):
            time.sleep(0.001)
        time.sleep(self.sleep_s)
        return {"y": inputs["x"] * 2}
"""


def write_sleepy_model(
    folder: Path, sleep_s: float, gate: Path | None = None, **settings: Any
) -> None:
    """A `python` model y = 2x over x FP32 [-1, 4] that takes sleep_s a batch (a model slow
    enough for queues to form); settings go to its config.toml. With a gate, a batch also waits
    while that file exists: a test holds the instance busy for exactly as long as it needs."""
    write_config(
        folder,
        backend="python",
        python={
            "device": "cpu",
            "sleep_s": sleep_s,
            "gate": str(gate or ""),
            "inputs": '[{ name = "x", datatype = "FP32", shape = [-1, 4] }]',
            "outputs": '[{ name = "y", datatype = "FP32", shape = [-1, 4] }]',
        },
        **settings,
    )
    (folder / "model.py").write_text(_SLEEPY_MODEL)


def _toml(value: Any) -> str:
    if isinstance(value, str) and value.startswith("[{"):
        return value  # an inline array of tables, written as TOML already
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def pair_model() -> onnx.ModelProto:
    """Two inputs of different types: a FP32 [-1,4] and b INT64 [-1,4]; out = a * 2 + float(b)."""
    nodes = [
        helper.make_node("Cast", ["b"], ["b_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["a", "two"], ["a2"]),
        helper.make_node("Add", ["a2", "b_float"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pair",
        inputs=[
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["batch", 4]),
        ],
        outputs=[helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def build_repository(root: Path) -> Path:
    """The test model repository.

    mlp       the bundled model and config (2 instances, 2 ms window)
    mlp_wide  mlp with a 300 ms window, max batch 8, 1 instance: concurrent callers share batches
    mlp_tiny_queue  mlp with a 2-request queue and a 2 s window: a third caller is refused
    pair      two inputs of different datatypes
    """
    build("mlp", root)
    artifact = root / "mlp" / "model.onnx"
    for name, settings in {
        # These two hold requests for their whole window (the static policy) on purpose.
        "mlp_wide": dict(
            max_batch_size=8, max_queue_delay_ms=300.0, instance_count=1, batching="static"
        ),
        "mlp_tiny_queue": dict(
            max_batch_size=64,
            max_queue_delay_ms=2000.0,
            queue_capacity=2,
            instance_count=1,
            batching="static",
        ),
    }.items():
        write_config(
            root / name,
            backend="onnxruntime",
            onnxruntime={"artifact": str(artifact)},
            **settings,
        )
    write_config(root / "pair", backend="onnxruntime", max_batch_size=16)
    onnx.save(pair_model(), root / "pair" / "model.onnx")
    return root


class MlpReference:
    """The mlp computed with numpy from the weights stored in its ONNX file."""

    def __init__(self, artifact: Path) -> None:
        weights = {
            t.name: numpy_helper.to_array(t) for t in onnx.load(str(artifact)).graph.initializer
        }
        self.w1, self.b1 = weights["w1"].astype(np.float64), weights["b1"].astype(np.float64)
        self.w2, self.b2 = weights["w2"].astype(np.float64), weights["b2"].astype(np.float64)

    def logits(self, x: np.ndarray) -> np.ndarray:
        hidden = np.maximum(x.astype(np.float64) @ self.w1 + self.b1, 0.0)
        return hidden @ self.w2 + self.b2

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        logits = self.logits(x)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    """Polls condition until it holds; fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}")
        time.sleep(0.01)
