"""A voice sequence stays on the version it started on across a reload (and that version is
released once the sequence ends); the repository API through tritonclient, its admin check
with auth on, and `tensorgate models index|load|unload`."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.client import Security, TensorgateClient
from tensorgate.kserve import grpc_service_pb2 as kpb
from tensorgate.kserve import grpc_service_pb2_grpc as kpb_grpc
from tensorgate.server.bundled import build
from tests.harness import ServerThread, wait_until
from tests.lifecycle.conftest import add_version, write_model

ROOT = Path(__file__).resolve().parents[2]
X = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)


def _chunk(
    kserve: kpb_grpc.GRPCInferenceServiceStub, sequence: int, start: bool = False, end: bool = False
) -> str:
    """One chunk of a silero_vad sequence through KServe; the version that ran it."""
    request = kpb.ModelInferRequest(model_name="silero_vad")
    request.inputs.add(name="audio", datatype="FP32", shape=[1, 512])
    request.raw_input_contents.append(np.zeros((1, 512), np.float32).tobytes())
    request.parameters["sequence_id"].int64_param = sequence
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    return str(kserve.ModelInfer(request, timeout=10).model_version)


def test_a_sequence_stays_on_its_version_across_a_reload(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    root = tmp_path / "engines"
    build("silero_vad", root)
    folder = root / "silero_vad"
    (folder / "1").mkdir()
    shutil.move(folder / "model.onnx", folder / "1" / "model.onnx")
    running = start_server(model_repository=root, model_control="explicit")
    with (
        grpc.insecure_channel(running.target) as channel,
        TensorgateClient(running.target, timeout_s=60) as c,
    ):
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert _chunk(kserve, 1, start=True) == "1"
        (folder / "2").mkdir()
        shutil.copyfile(folder / "1" / "model.onnx", folder / "2" / "model.onnx")
        c.load_model("silero_vad")
        assert _chunk(kserve, 2, start=True) == "2"  # new sequences: the new version
        for _ in range(3):
            assert _chunk(kserve, 1) == "1"  # the live one: where it started
        states = {(e.version, e.state) for e in c.repository_index()}
        assert states == {("1", "UNLOADING"), ("2", "READY")}
        assert _chunk(kserve, 1, end=True) == "1"
        wait_until(
            lambda: {(e.version, e.state) for e in c.repository_index()} == {("2", "READY")},
            what="version 1 released once its sequence ended",
        )
        assert _chunk(kserve, 2, end=True) == "2"


def test_tritonclient_lists_loads_and_unloads(
    start_server: Callable[..., ServerThread], tmp_path: Path, triton_python: Path
) -> None:
    folder = write_model(tmp_path / "engines", versions={"1": 1.0})
    write_model(tmp_path / "engines", name="other", versions={"1": 5.0})
    running = start_server(model_repository=tmp_path / "engines", model_control="explicit")
    add_version(folder, "2", 2.0)
    done = subprocess.run(
        [str(triton_python), str(ROOT / "tests" / "lifecycle" / "tritonclient_repository.py"),
         running.target],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["index"] == [
        {"name": "other", "version": "1", "state": "READY"},
        {"name": "scaled", "version": "1", "state": "READY"},
    ]
    # (as_json leaves out empty fields: the version of a model not loaded)
    assert seen["after_unload"][0] == {
        "name": "other",
        "state": "UNAVAILABLE",
        "reason": "not loaded",
    }
    assert seen["other_ready_after_unload"] == "StatusCode.NOT_FOUND"  # as any unknown name
    assert seen["after_load"]["other"] == [{"version": "1", "state": "READY"}]
    assert seen["scaled_after_reload"] == 2.0
    assert "not in the model repository" in seen["load_unknown"]


def _tokens(path: Path) -> Path:
    lines = [f"{t} {hashlib.sha256(t.encode()).hexdigest()}" for t in ("admin", "team")]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_only_admin_tenants_may_use_the_repository_api(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    write_model(tmp_path / "engines", versions={"1": 1.0})
    running = start_server(
        model_repository=tmp_path / "engines",
        model_control="explicit",
        auth_tokens=str(_tokens(tmp_path / "tokens")),
        admin_tenants=("admin",),
    )
    with TensorgateClient(running.target, timeout_s=10, security=Security(token="team")) as team:
        for call in (team.repository_index, lambda: team.load_model("scaled"),
                     lambda: team.unload_model("scaled")):  # fmt: skip
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "--admin-tenants" in refused.value.details()
        assert team.predict("scaled", {"x": X})["y"][0, 0] == 1.0  # inference is not admin
    with TensorgateClient(running.target, timeout_s=10, security=Security(token="admin")) as admin:
        admin.unload_model("scaled")
        admin.load_model("scaled")
        assert [(e.name, e.state) for e in admin.repository_index()] == [("scaled", "READY")]


def test_the_cli_indexes_loads_and_unloads(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    folder = write_model(tmp_path / "engines", versions={"1": 1.0})
    running = start_server(model_repository=tmp_path / "engines", model_control="explicit")

    def cli(*args: str) -> list[dict[str, object]]:
        done = subprocess.run(
            [sys.executable, "-m", "tensorgate", "models", *args, "--target", running.target],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    assert cli("index") == [{"name": "scaled", "version": "1", "state": "READY"}]
    add_version(folder, "2", 2.0)
    assert cli("load", "scaled") == [{"name": "scaled", "loaded": True, "versions": ["2"]}]
    assert cli("unload", "scaled") == [{"name": "scaled", "unloaded": True}]
    wait_until(lambda: cli("index")[0]["state"] == "UNAVAILABLE", what="the model shown not loaded")
    missing = subprocess.run(
        [sys.executable, "-m", "tensorgate", "models", "load", "--target", running.target],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "name the model" in missing.stderr
