"""google.longrunning.Operations over the jobs, through the generated stubs any Operations client
uses: Get, List (tenant-scoped, filtered by status, paged), Cancel, Delete and Wait; on both job
stores."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.longrunning import operations_pb2_grpc
from google.longrunning import operations_proto_pb2 as lro
from google.protobuf import duration_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tensorgate.client import TensorgateClient
from tensorgate.client.codec import decode_all
from tensorgate.v1 import inference_pb2 as pb
from tests.harness import ServerThread
from tests.jobs.test_watch import _gated, _row

X = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)


@pytest.fixture
def operations(server: ServerThread) -> Iterator[operations_pb2_grpc.OperationsStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield operations_pb2_grpc.OperationsStub(channel)


def test_a_finished_job_is_a_done_operation_with_its_response_and_metadata(
    server: ServerThread, operations: operations_pb2_grpc.OperationsStub
) -> None:
    with TensorgateClient(server.target, timeout_s=10) as c:
        job = c.submit("mlp", {"input": X}, request_id="op-1")
        expected = c.predict("mlp", {"input": X})
    op = operations.WaitOperation(
        lro.WaitOperationRequest(
            name=f"jobs/{job.job_id}", timeout=duration_pb2.Duration(seconds=10)
        ),
        timeout=20,
    )
    assert op.name == f"jobs/{job.job_id}" and op.done
    assert op.WhichOneof("result") == "response"
    response = pb.PredictResponse()
    assert op.response.Unpack(response)
    assert response.model == "mlp" and response.id == "op-1"
    for name, array in decode_all(response.outputs).items():
        np.testing.assert_allclose(array, expected[name], rtol=1e-6)
    metadata = pb.JobMetadata()
    assert op.metadata.Unpack(metadata)
    assert metadata.job_id == job.job_id and metadata.model == "mlp"
    assert metadata.status == pb.SUCCEEDED and metadata.attempts == 1
    assert metadata.request_id == "op-1"
    created, started, ended = (
        t.ToNanoseconds() for t in (metadata.create_time, metadata.start_time, metadata.end_time)
    )
    assert 0 < created <= started <= ended
    assert operations.GetOperation(lro.GetOperationRequest(name=op.name), timeout=10) == op


def test_cancel_wait_and_delete(
    start_server: Callable[..., ServerThread], tmp_path: Path, job_store: str
) -> None:
    root = tmp_path / "engines"
    gate = _gated(root)
    running = start_server(model_repository=root)
    with (
        TensorgateClient(running.target, timeout_s=10) as c,
        grpc.insecure_channel(running.target) as channel,
    ):
        operations = operations_pb2_grpc.OperationsStub(channel)
        for i in range(2):
            c.submit("gated", {"x": _row(1.0 + i)})
        name = f"jobs/{c.submit('gated', {'x': _row(3.0)}).job_id}"
        # Wait returns the operation unfinished when its timeout passes first.
        waited = operations.WaitOperation(
            lro.WaitOperationRequest(name=name, timeout=duration_pb2.Duration(nanos=200_000_000)),
            timeout=10,
        )
        assert not waited.done
        with pytest.raises(grpc.RpcError) as unfinished:
            operations.DeleteOperation(lro.DeleteOperationRequest(name=name), timeout=10)
        assert unfinished.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cancel it first" in unfinished.value.details()
        operations.CancelOperation(lro.CancelOperationRequest(name=name), timeout=10)
        cancelled = operations.GetOperation(lro.GetOperationRequest(name=name), timeout=10)
        assert cancelled.done and cancelled.error.code == grpc.StatusCode.CANCELLED.value[0]
        operations.DeleteOperation(lro.DeleteOperationRequest(name=name), timeout=10)
        with pytest.raises(grpc.RpcError) as gone:
            operations.GetOperation(lro.GetOperationRequest(name=name), timeout=10)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        gate.joinpath("open").touch()


def test_list_is_paged_newest_first_and_filtered_by_status(
    start_server: Callable[..., ServerThread], job_store: str
) -> None:
    running = start_server()
    with (
        TensorgateClient(running.target, timeout_s=10) as c,
        grpc.insecure_channel(running.target) as channel,
    ):
        operations = operations_pb2_grpc.OperationsStub(channel)
        ids = [c.submit("mlp", {"input": X}).job_id for _ in range(25)]
        for job_id in ids:
            assert c.get_result(job_id, wait_timeout_s=10).status == "SUCCEEDED"
        listed: list[str] = []
        token = ""
        pages = 0
        while True:
            page = operations.ListOperations(
                lro.ListOperationsRequest(
                    name="jobs", filter='status = "SUCCEEDED"', page_size=7, page_token=token
                ),
                timeout=10,
            )
            pages += 1
            assert len(page.operations) <= 7
            listed += [op.name.removeprefix("jobs/") for op in page.operations]
            token = page.next_page_token
            if not token:
                break
        assert pages == 4
        assert listed == list(reversed(ids))  # newest first, each once
        none = operations.ListOperations(
            lro.ListOperationsRequest(filter="status=FAILED"), timeout=10
        )
        assert list(none.operations) == []
        for bad, says in (("model = mlp", "only status"), ("status = DONE", "PENDING")):
            with pytest.raises(grpc.RpcError) as refused:
                operations.ListOperations(lro.ListOperationsRequest(filter=bad), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert says in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            operations.ListOperations(lro.ListOperationsRequest(page_token="junk"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bad_operation_name_is_refused_by_name(
    operations: operations_pb2_grpc.OperationsStub,
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        operations.GetOperation(lro.GetOperationRequest(name="operations/123"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "jobs/<job_id>" in refused.value.details()


def test_reflection_lists_the_operations_service(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [answer] = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
    names = {s.name for s in answer.list_services_response.service}
    assert "google.longrunning.Operations" in names
