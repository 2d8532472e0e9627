"""The `tensorgate` console script: serve in its own process, and the client commands."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TENSORGATE = [sys.executable, "-m", "tensorgate"]
ROOT = Path(__file__).resolve().parents[2]


class ServeProcess:
    def __init__(self, repository: Path) -> None:
        # Flags and their TENSORGATE_* environment equivalents, both exercised.
        env = {
            **os.environ,
            "TENSORGATE_MODELS": "mlp,pair",
            "TENSORGATE_PORT": "0",
            "TENSORGATE_METRICS_PORT": "0",  # never the default 8002 `make serve` may hold
        }
        self.process = subprocess.Popen(
            [*TENSORGATE, "serve", "--host", "127.0.0.1", "--model-repository", str(repository)],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.port = 0
        deadline = time.monotonic() + 60
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
            if "serving mlp, pair on port" in line:
                return
        raise AssertionError("server did not start:\n" + "".join(self.log))

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TENSORGATE, *args, "--target", f"127.0.0.1:{self.port}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def terminate(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, rest = self.process.communicate(timeout=30)
        return self.process.returncode, "".join(self.log) + rest


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    from tests.harness import build_repository

    running = ServeProcess(build_repository(tmp_path_factory.mktemp("cli-engines")))
    yield running
    if running.process.poll() is None:
        running.process.kill()


def test_predict_prints_the_outputs(serve: ServeProcess) -> None:
    result = serve.run("predict", "--model", "mlp", "--random-rows", "3", "--outputs", "logits")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["logits"]["shape"] == [3, 16] and len(shown["logits"]["data"]) == 3


def test_predict_with_json_inputs_typed_from_the_metadata(serve: ServeProcess) -> None:
    result = serve.run(
        "predict", "--model", "pair", "--input", "a=[[1,2,3,4]]", "--input", "b=[[1,1,1,1]]"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["out"]["data"] == [[3.0, 5.0, 7.0, 9.0]]


def test_predict_reports_a_refusal_with_its_code(serve: ServeProcess) -> None:
    result = serve.run("predict", "--model", "mlp", "--input", "input=[[1,2]]")
    assert result.returncode == 1
    assert (
        "INVALID_ARGUMENT: input 'input' has shape [1,2], model expects [-1,256]" in result.stderr
    )


def test_submit_then_result(serve: ServeProcess) -> None:
    submitted = serve.run("submit", "--model", "mlp", "--random-rows", "1")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    result = serve.run("result", job_id, "--wait-s", "10")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["status"] == "SUCCEEDED" and shown["outputs"]["probabilities"]["shape"] == [1, 16]
    cancelled = serve.run("cancel", job_id)
    assert json.loads(cancelled.stdout)["status"] == "SUCCEEDED"


def test_watch_prints_one_line_per_event_to_the_final_one(serve: ServeProcess) -> None:
    submitted = serve.run("submit", "--model", "mlp", "--random-rows", "1")
    job_id = json.loads(submitted.stdout)["job_id"]
    watched = serve.run("watch", job_id)
    assert watched.returncode == 0, watched.stderr
    lines = [json.loads(line) for line in watched.stdout.splitlines()]
    assert lines[-1]["status"] == "SUCCEEDED" and lines[-1]["job_id"] == job_id
    assert lines[-1]["outputs"]["probabilities"]["shape"] == [1, 16]
    assert all(line["status"] in ("PENDING", "RUNNING") for line in lines[:-1])
    unknown = serve.run("watch", "f" * 32)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_stream_prints_one_answer_per_request(serve: ServeProcess) -> None:
    result = serve.run("stream", "--model", "mlp", "--random-rows", "1", "--count", "5")
    assert result.returncode == 0, result.stderr
    ids = sorted(json.loads(line)["id"] for line in result.stdout.splitlines())
    assert ids == [f"req-{i}" for i in range(5)]


def test_models_lists_inputs_and_outputs(serve: ServeProcess) -> None:
    result = serve.run("models")
    models = {m["name"]: m for m in map(json.loads, result.stdout.splitlines())}
    assert models["mlp"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 256]}]
    assert models["pair"]["ready"]


def test_health_command_reports_serving(serve: ServeProcess) -> None:
    result = serve.run("health")
    assert result.returncode == 0 and json.loads(result.stdout)["status"] == "SERVING"
    assert serve.run("health", "--service", "mlp").returncode == 0
    unknown = serve.run("health", "--service", "nope")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    assert "no health service named 'nope'" in unknown.stderr


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("input=@no-such.npy", "--input input=@no-such.npy: no such file"),
        ("input=notjson", "--input input=…: not JSON (Expecting value at character 0)"),
        ("input", "expected NAME=@FILE.npy or NAME=JSON"),
    ],
)
def test_input_mistakes_get_one_line(serve: ServeProcess, given: str, message: str) -> None:
    result = serve.run("predict", "--model", "mlp", "--input", given)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["predict", "--random-rows", "-1"], 2,
         "argument --random-rows: expected a number of rows >= 1, got '-1'"),
        (["predict", "--model", "pair", "--input", 'a=[["x", 1, 2, 3]]',
          "--input", "b=[[1,1,1,1]]"],
         2, "--input a=…: input 'a' takes FP32, and the JSON holds something else"),
        (["predict", "--tls-ca", "/nope.crt", "--random-rows", "1"], 2,
         "error: --tls-ca /nope.crt: No such file or directory"),
        (["health", "--service", "tensorgate.worker.0"], 1,
         "each worker process answers only its own name"),
    ],
)  # fmt: skip
def test_a_users_mistake_gets_one_line_naming_what_was_wrong(
    serve: ServeProcess, args: list[str], code: int, expected: str
) -> None:
    result = serve.run(*args)
    assert result.returncode == code, result.stderr
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_sigterm_shuts_down_cleanly(serve: ServeProcess) -> None:
    code, log = serve.terminate()
    assert code == 0, log
    assert "SIGTERM: shutting down" in log and "stopped" in log


def test_serve_refuses_a_missing_repository_with_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TENSORGATE, "serve", "--port", "0", "--model-repository", str(tmp_path / "none")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "model repository" in result.stderr and "is not a directory" in result.stderr
    assert "--model-repository" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--port", "for gRPC: the port is taken or the address is not this machine's; "
                   "choose another with --port"),
        ("--metrics-port", "choose another with --metrics-port (-1 = off)"),
    ],
)  # fmt: skip
def test_a_taken_port_gets_one_line_naming_its_flag(
    repository: Path, flag: str, message: str
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"--port": "0", "--metrics-port": "-1", flag: port}
        result = subprocess.run(
            [*TENSORGATE, "serve", "--host", "127.0.0.1", "--model-repository", str(repository),
             *(item for pair in ports.items() for item in pair)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr


def test_serve_exits_with_one_line_when_no_model_loads(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.toml").write_text('backend = "onnxruntime"\n')
    result = subprocess.run(
        [*TENSORGATE, "serve", "--port", "0", "--metrics-port", "-1",
         "--model-repository", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "no model could be loaded: model 'broken':" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("TENSORGATE_PORT", "tcp://10.96.1.2:50051", "not a valid --port: expected a whole number"),
        ("TENSORGATE_JOB_TTL_S", "soon", "not a valid --job-ttl-s: expected a number"),
        ("TENSORGATE_WORKERS", "many", "not a valid --workers: expected a number >= 1 or auto"),
        ("TENSORGATE_METRICS_TENANT_LABEL", "maybe", "expected true or false"),
        ("TENSORGATE_LOG_LEVEL", "LOUD", "not a valid --log-level: expected one of DEBUG"),
    ],
)  # fmt: skip
def test_a_bad_environment_value_gets_one_line_naming_the_variable_and_value(
    variable: str, value: str, expected: str
) -> None:
    result = subprocess.run(
        [*TENSORGATE, "serve"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, variable: value},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"environment variable {variable}={value!r} is {expected}"[:60] in result.stderr
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_bad_serve_variable_does_not_break_the_other_commands(repository: Path) -> None:
    """`tensorgate health` is the image's HEALTHCHECK: a pod's injected TENSORGATE_PORT must not
    break it (it used to fail while the serve flags were built)."""
    served = ServeProcess(repository)
    try:
        result = subprocess.run(
            [*TENSORGATE, "health", "--target", f"127.0.0.1:{served.port}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={**os.environ, "TENSORGATE_PORT": "tcp://10.96.1.2:50051"},
        )  # fmt: skip
    finally:
        served.terminate()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "SERVING"


def test_serve_help_names_each_default_once() -> None:
    result = subprocess.run(
        [*TENSORGATE, "serve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert result.returncode == 0
    repository = [line for line in result.stdout.splitlines() if "--model-repository" in line]
    assert repository and all(line.count("default:") <= 1 for line in result.stdout.splitlines())
    assert "(default: engines; env TENSORGATE_MODEL_REPOSITORY)" in result.stdout
    assert "--metrics-port" in result.stdout and "(default: 8002;" in result.stdout
