"""Versions in the repository: version policies, requests naming a version, metadata, readiness
and statistics per version on both front ends, and a canary split of the default route."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.client import StreamItem, TensorgateClient
from tensorgate.kserve import grpc_service_pb2 as kpb
from tensorgate.kserve import grpc_service_pb2_grpc as kpb_grpc
from tensorgate.server.config import ConfigError
from tensorgate.server.repository import read_model
from tests.harness import ServerThread
from tests.lifecycle.conftest import write_model

X = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)


def _factor(outputs: dict[str, np.ndarray]) -> float:
    return float(outputs["y"][0, 0])


@pytest.mark.parametrize(
    ("policy", "served"),
    [("", ["3"]), ("{ latest = 2 }", ["2", "3"]), ('"all"', ["1", "2", "3"]),
     ("{ specific = [1, 3] }", ["1", "3"])],
)  # fmt: skip
def test_the_version_policy_picks_the_versions_served(
    tmp_path: Path, policy: str, served: list[str]
) -> None:
    folder = write_model(tmp_path, versions={"1": 1.0, "2": 2.0, "3": 3.0}, policy=policy)
    assert [c.version for c in read_model(folder)] == served
    assert [c.path.name for c in read_model(folder)] == served


def test_a_flat_model_is_version_1_and_bad_policies_are_refused(tmp_path: Path) -> None:
    [flat] = read_model(Path(__file__).resolve().parents[2] / "server/bundled/models/mlp")
    assert flat.version == "1"
    for policy, says in (("{ latest = 0 }", "version_policy.latest"), ('"newest"', "must be")):
        folder = write_model(tmp_path / policy.replace(" ", ""), versions={"1": 1}, policy=policy)
        with pytest.raises(ConfigError, match=says):
            read_model(folder)
    folder = write_model(tmp_path / "t", versions={"1": 1.0}, traffic={"1": 50, "2": 50})
    with pytest.raises(ConfigError, match=r"traffic\.weights name version"):
        read_model(folder)


def test_a_request_names_its_version_on_both_front_ends(
    lifecycle_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    write_model(tmp_path / "engines", versions={"1": 1.0, "2": 2.0}, policy='"all"')
    running = lifecycle_server()
    with TensorgateClient(running.target, timeout_s=10) as c:
        assert _factor(c.predict("scaled", {"x": X})) == 2.0  # the default: the highest
        assert _factor(c.predict("scaled", {"x": X}, model_version="1")) == 1.0
        assert _factor(c.predict("scaled", {"x": X}, model_version="2")) == 2.0
        job = c.submit("scaled", {"x": X}, model_version="1")
        assert _factor(c.get_result(job.job_id, wait_timeout_s=10).outputs) == 1.0
        [answer] = list(c.stream([StreamItem("a", "scaled", {"x": X}, model_version="1")]))
        assert _factor(answer.outputs) == 1.0
        with pytest.raises(grpc.RpcError) as unknown:
            c.predict("scaled", {"x": X}, model_version="7")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no version '7' served; served versions: 1, 2" in unknown.value.details()
        [summary] = [m for m in c.list_models() if m.name == "scaled"]
        assert summary.versions == ("1", "2")
        assert c.model_metadata("scaled", "1").version == "1"
        assert c.model_metadata("scaled").versions == ("1", "2")
    with grpc.insecure_channel(running.target) as channel:
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        request = kpb.ModelInferRequest(model_name="scaled", model_version="1")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(X.tobytes())
        response = kserve.ModelInfer(request, timeout=10)
        assert response.model_version == "1"
        assert np.frombuffer(response.raw_output_contents[0], np.float32)[0] == 1.0
        assert (
            kserve.ModelInfer(
                kpb.ModelInferRequest(
                    model_name="scaled", inputs=request.inputs, raw_input_contents=[X.tobytes()]
                ),
                timeout=10,
            ).model_version
            == "2"
        )
        assert kserve.ModelReady(kpb.ModelReadyRequest(name="scaled", version="1")).ready
        meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="scaled"), timeout=10)
        assert list(meta.versions) == ["1", "2"]
        stats = kserve.ModelStatistics(kpb.ModelStatisticsRequest(name="scaled"), timeout=10)
        by_version = {s.version: s.inference_stats.success.count for s in stats.model_stats}
        assert by_version["1"] >= 3 and by_version["2"] >= 2
        with pytest.raises(grpc.RpcError) as unknown:
            kserve.ModelReady(kpb.ModelReadyRequest(name="scaled", version="9"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_canary_split_is_measured_within_tolerance_and_named_versions_bypass_it(
    lifecycle_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    write_model(
        tmp_path / "engines",
        versions={"1": 1.0, "2": 2.0},
        policy='"all"',
        traffic={"1": 90, "2": 10},
    )
    running = lifecycle_server(metrics_port=0)
    calls = 2000
    with TensorgateClient(running.target, timeout_s=10) as c:
        counts = collections.Counter(_factor(c.predict("scaled", {"x": X})) for _ in range(calls))
        named = {_factor(c.predict("scaled", {"x": X}, model_version="2")) for _ in range(20)}
        [summary] = [m for m in c.list_models() if m.name == "scaled"]
    # 10% of 2,000 is 200, one standard deviation 13.4: five of them either way.
    assert 133 <= counts[2.0] <= 267, counts
    assert counts[1.0] + counts[2.0] == calls
    assert named == {2.0}
    assert dict(summary.traffic) == {"1": 90, "2": 10}
    # A canary is compared with its baseline by the version label.
    import urllib.request

    text = (
        urllib.request.urlopen(
            f"http://127.0.0.1:{running.server.metrics_port}/metrics", timeout=10
        )
        .read()
        .decode()
    )
    for version, count in (("1", counts[1.0]), ("2", counts[2.0] + 20)):
        line = (
            'tensorgate_requests_total{code="OK",kind="unary",model="scaled",'
            f'version="{version}"}} {float(count)}'
        )
        assert line in text, line
