"""TLS, mutual TLS, bearer tokens and tenants, with real certificates and a real server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.longrunning import operations_proto_pb2
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tensorgate.client import Security, TensorgateClient
from tensorgate.kserve import grpc_service_pb2
from tensorgate.v1 import inference_pb2
from tests.harness import ServerThread, wait_until
from tests.security.certs import Authority

X = np.zeros((1, 256), np.float32)
TOKENS = {"team-a": "token-of-team-a", "team-b": "token-of-team-b"}
ROOT = Path(__file__).resolve().parents[2]


def _token_file(path: Path, tokens: dict[str, str]) -> Path:
    lines = [f"{tenant} {hashlib.sha256(t.encode()).hexdigest()}" for tenant, t in tokens.items()]
    path.write_text("# tenant sha256(token)\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = Authority(tmp_path / "pki")
    return {
        "ca": ca,
        "server": ca.issue("tensorgate", server=True),
        "team-a": ca.issue("team-a"),
        "team-b": ca.issue("team-b"),
    }


@pytest.fixture
def tokens_server(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> Iterator[ServerThread]:
    yield start_server(auth_tokens=str(_token_file(tmp_path / "tokens", TOKENS)))


def _client(server: ServerThread, **security: str) -> TensorgateClient:
    return TensorgateClient(server.target, timeout_s=10, security=Security(**security))


# --- TLS ------------------------------------------------------------------------------------


def test_tls_port_refuses_plaintext_and_serves_a_client_trusting_its_ca(
    start_server: Callable[..., ServerThread], pki: dict[str, Any]
) -> None:
    server = start_server(tls_cert=str(pki["server"].cert), tls_key=str(pki["server"].key))
    with _client(server) as plaintext, pytest.raises(grpc.RpcError) as refused:
        plaintext.predict("mlp", {"input": X}, timeout_s=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with _client(server, tls_ca=str(pki["ca"].cert)) as client:
        assert client.predict("mlp", {"input": X})["logits"].shape == (1, 16)


def test_mutual_tls_needs_a_client_certificate_and_its_name_is_the_tenant(
    start_server: Callable[..., ServerThread], pki: dict[str, Any]
) -> None:
    server = start_server(
        tls_cert=str(pki["server"].cert),
        tls_key=str(pki["server"].key),
        tls_client_ca=str(pki["ca"].cert),
    )
    ca = str(pki["ca"].cert)
    with _client(server, tls_ca=ca) as anonymous, pytest.raises(grpc.RpcError) as refused:
        anonymous.predict("mlp", {"input": X}, timeout_s=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
    stranger = Authority(pki["ca"].folder / "other", "another CA").issue("intruder")
    with (
        _client(server, tls_ca=ca, tls_cert=str(stranger.cert), tls_key=str(stranger.key)) as c,
        pytest.raises(grpc.RpcError) as untrusted,
    ):
        c.predict("mlp", {"input": X}, timeout_s=3)
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
    a = {"tls_ca": ca, "tls_cert": str(pki["team-a"].cert), "tls_key": str(pki["team-a"].key)}
    b = {"tls_ca": ca, "tls_cert": str(pki["team-b"].cert), "tls_key": str(pki["team-b"].key)}
    with _client(server, **a) as as_a, _client(server, **b) as as_b:
        job = as_a.submit("mlp", {"input": X})
        assert as_a.get_result(job.job_id, wait_timeout_s=10).status == "SUCCEEDED"
        with pytest.raises(grpc.RpcError) as hidden:
            as_b.get_result(job.job_id)
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND


def test_certificates_are_re_read_when_their_files_change(
    start_server: Callable[..., ServerThread], pki: dict[str, Any], tmp_path: Path
) -> None:
    server = start_server(tls_cert=str(pki["server"].cert), tls_key=str(pki["server"].key))
    new_ca = Authority(tmp_path / "renewed", "renewed CA")
    renewed = new_ca.issue("tensorgate", server=True, stem="renewed")
    time.sleep(0.01)  # a later modification time than the first files'
    pki["server"].cert.write_bytes(renewed.cert.read_bytes())
    pki["server"].key.write_bytes(renewed.key.read_bytes())

    def served_under_new_ca() -> bool:
        with _client(server, tls_ca=str(new_ca.cert)) as client:
            try:
                client.predict("mlp", {"input": X}, timeout_s=2)
                return True
            except grpc.RpcError:
                return False

    wait_until(served_under_new_ca, timeout_s=15, what="the renewed certificate served")


# --- tokens -----------------------------------------------------------------------------------


def _methods() -> list[tuple[str, Any, str]]:
    """(path, request class, streaming kind) of every RPC of both front ends and of
    google.longrunning.Operations."""
    found = []
    services = (
        (inference_pb2, "Inference"),
        (grpc_service_pb2, "GRPCInferenceService"),
        (operations_proto_pb2, "Operations"),
    )
    for module, name in services:
        service = module.DESCRIPTOR.services_by_name[name]
        for method in service.methods:
            request = message_factory.GetMessageClass(method.input_type)
            path = f"/{service.full_name}/{method.name}"
            kind = "both" if method.client_streaming else ""
            kind = kind or ("server" if method.server_streaming else "")
            found.append((path, request, kind))
    return found


def _code(channel: grpc.Channel, path: str, request: Any, streaming: str, token: str) -> Any:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    serialize, keep = request.SerializeToString, (lambda raw: raw)
    try:
        if streaming == "both":
            call = channel.stream_stream(path, serialize, keep)
            for _ in call(iter([request()]), timeout=10, metadata=metadata):
                pass
        elif streaming == "server":
            for _ in channel.unary_stream(path, serialize, keep)(
                request(), timeout=10, metadata=metadata
            ):
                pass
        else:
            channel.unary_unary(path, serialize, keep)(request(), timeout=10, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_rpc_of_both_front_ends_needs_a_valid_token(tokens_server: ServerThread) -> None:
    methods = _methods()
    assert len(methods) >= 21  # every method of the three services
    with grpc.insecure_channel(tokens_server.target) as channel:
        for path, request, streaming in methods:
            assert _code(channel, path, request, streaming, "") == grpc.StatusCode.UNAUTHENTICATED
            assert _code(channel, path, request, streaming, "wrong") == (
                grpc.StatusCode.UNAUTHENTICATED
            ), path
            allowed = _code(channel, path, request, streaming, TOKENS["team-a"])
            assert allowed != grpc.StatusCode.UNAUTHENTICATED, path


def test_health_stays_open_and_reflection_needs_a_token(tokens_server: ServerThread) -> None:
    with grpc.insecure_channel(tokens_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.RpcError) as refused:
            list(reflection.ServerReflectionInfo(iter(ask)))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        bearer = (("authorization", f"Bearer {TOKENS['team-a']}"),)
        [answer] = list(reflection.ServerReflectionInfo(iter(ask), metadata=bearer))
        names = {s.name for s in answer.list_services_response.service}
        assert "tensorgate.v1.Inference" in names


def test_a_tenants_jobs_are_invisible_to_another_through_every_job_rpc(
    tokens_server: ServerThread,
) -> None:
    with (
        _client(tokens_server, token=TOKENS["team-a"]) as a,
        _client(tokens_server, token=TOKENS["team-b"]) as b,
    ):
        job = a.submit("mlp", {"input": X}, idempotency_key="order-1")
        assert a.get_result(job.job_id, wait_timeout_s=10).status == "SUCCEEDED"
        for call in (b.get_result, b.cancel):
            with pytest.raises(grpc.RpcError) as hidden:
                call(job.job_id)
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
            assert "is unknown or its result has expired" in hidden.value.details()
        assert job.job_id not in [j.job_id for j in b.list_jobs()]
        assert job.job_id in [j.job_id for j in a.list_jobs()]
        # Idempotency keys are per tenant: B's "order-1" is a job of its own.
        other = b.submit("mlp", {"input": X}, idempotency_key="order-1")
        assert other.job_id != job.job_id and not other.deduplicated
        assert a.submit("mlp", {"input": X}, idempotency_key="order-1").deduplicated


def test_the_token_file_is_re_read_when_it_changes(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    path = _token_file(tmp_path / "tokens", {"team-a": TOKENS["team-a"]})
    server = start_server(auth_tokens=str(path))
    with _client(server, token="new-token") as newcomer:
        with pytest.raises(grpc.RpcError) as refused:
            newcomer.predict("mlp", {"input": X})
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        _token_file(path, {"team-a": TOKENS["team-a"], "team-c": "new-token"})

        def accepted() -> bool:
            try:
                newcomer.predict("mlp", {"input": X})
                return True
            except grpc.RpcError:
                return False

        wait_until(accepted, timeout_s=10, what="the new token accepted")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        ("team-a not-a-hash\n", "line 1: expected 'TENANT SHA256HEX'"),
        (f"team-a {'a' * 64}\nteam-a {'b' * 64}\n", "line 2: tenant 'team-a' is listed twice"),
        ("# nothing\n", "no tokens in the file"),
    ],
)
def test_a_bad_token_file_is_refused_at_start_with_one_line(
    tmp_path: Path, repository: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "tensorgate", "serve", "--port", "0", "--metrics-port", "-1",
         "--model-repository", str(repository), "--auth-tokens", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert message in done.stderr and "--auth-tokens" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# --- per-tenant limits and metrics ----------------------------------------------------------


def test_a_tenant_over_its_rate_is_refused_with_a_retry_hint_while_others_are_served(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server = start_server(
        auth_tokens=str(_token_file(tmp_path / "tokens", TOKENS)), tenant_rate=5.0
    )
    with (
        _client(server, token=TOKENS["team-a"]) as a,
        _client(server, token=TOKENS["team-b"]) as b,
    ):
        refused = None
        for _ in range(50):
            try:
                a.predict("mlp", {"input": X})
            except grpc.RpcError as exc:
                refused = exc
                break
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'team-a' is over its rate of 5 requests/s" in refused.details()
        trailing = dict(refused.trailing_metadata() or ())
        assert 0 < int(trailing["retry-after-ms"]) <= 1000
        assert b.predict("mlp", {"input": X})["logits"].shape == (1, 16)


def test_pending_jobs_are_bounded_per_tenant(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server = start_server(
        auth_tokens=str(_token_file(tmp_path / "tokens", TOKENS)),
        max_pending_jobs_per_tenant=2,
    )
    slow = {"input": X}  # one row: held in the model's 2 s window, waiting for company
    with (
        _client(server, token=TOKENS["team-a"]) as a,
        _client(server, token=TOKENS["team-b"]) as b,
    ):
        for _ in range(2):
            a.submit("mlp_tiny_queue", slow)
        with pytest.raises(grpc.RpcError) as refused:
            a.submit("mlp_tiny_queue", slow)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'team-a' has 2 unfinished jobs" in refused.value.details()
        assert b.submit("mlp", {"input": X}).status == "PENDING"


def test_metrics_carry_the_tenant_only_when_asked(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    tokens = str(_token_file(tmp_path / "tokens", TOKENS))
    labelled = start_server(auth_tokens=tokens, metrics_port=0, metrics_tenant_label=True)
    plain = start_server(auth_tokens=tokens, metrics_port=0)
    import urllib.request

    for server in (labelled, plain):
        with _client(server, token=TOKENS["team-a"]) as a:
            a.predict("mlp", {"input": X})
    scraped = {
        name: urllib.request.urlopen(
            f"http://127.0.0.1:{s.server.metrics_port}/metrics", timeout=5
        ).read().decode()
        for name, s in (("labelled", labelled), ("plain", plain))
    }  # fmt: skip
    assert 'tenant="team-a"' in scraped["labelled"]
    assert "tenant=" not in scraped["plain"]


def test_a_failed_tls_handshake_is_one_line_from_the_cli_without_grpc_core_noise(
    start_server: Callable[..., ServerThread], pki: dict[str, Any], tmp_path: Path
) -> None:
    """A client trusting another CA: the command prints its own one line; gRPC core's log lines
    (ssl_transport_security … Handshake failed) stay out of its output."""
    server = start_server(tls_cert=str(pki["server"].cert), tls_key=str(pki["server"].key))
    other = Authority(tmp_path / "other-pki", name="another CA")
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    done = subprocess.run(
        [sys.executable, "-m", "tensorgate", "health", "--target", server.target,
         "--tls-ca", str(other.cert), "--timeout-s", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: UNAVAILABLE"), done.stderr
    assert "ssl_transport_security" not in done.stderr


def test_every_call_passes_the_one_door_job_reads_are_charged_and_counted(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    """GetResult and ListJobs go through the same wrapper as Predict: charged to the tenant's
    rate and counted (tensorgate_calls_total)."""
    server = start_server(
        auth_tokens=str(_token_file(tmp_path / "tokens", TOKENS)), tenant_rate=5.0
    )
    with _client(server, token=TOKENS["team-a"]) as a:
        job = a.submit("mlp", {"input": X})
        refused = None
        for _ in range(50):
            try:
                a.get_result(job.job_id)
                a.list_jobs()
            except grpc.RpcError as exc:
                refused = exc
                break
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'team-a' is over its rate" in refused.details()
    assert server.server.telemetry is not None
    calls = server.server.telemetry.metrics.calls

    def counted(method: str, code: str) -> float:
        return calls.labels(method, code).value

    assert counted("Submit", "OK") == 1
    assert counted("GetResult", "OK") >= 1 and counted("ListJobs", "OK") >= 1
    # The refusal is counted as the call ends, just after its status went out.
    wait_until(
        lambda: sum(counted(m, "RESOURCE_EXHAUSTED") for m in ("GetResult", "ListJobs")) == 1,
        what="the refusal counted",
    )


def test_watches_and_operations_are_scoped_by_tenant(tokens_server: ServerThread) -> None:
    """Another tenant's job is NOT_FOUND to WatchJob and to every Operations call, and is not
    listed; its own tenant sees it."""
    from google.longrunning import operations_pb2_grpc as lro_grpc

    with _client(tokens_server, token=TOKENS["team-a"]) as a:
        job = a.submit("mlp", {"input": X})
        events = list(a.watch(job.job_id))
        assert events[-1].status == "SUCCEEDED"
    name = f"jobs/{job.job_id}"
    with grpc.insecure_channel(tokens_server.target) as channel:
        operations = lro_grpc.OperationsStub(channel)
        as_b = (("authorization", f"Bearer {TOKENS['team-b']}"),)
        as_a = (("authorization", f"Bearer {TOKENS['team-a']}"),)
        calls = (
            (operations.GetOperation, operations_proto_pb2.GetOperationRequest(name=name)),
            (operations.WaitOperation, operations_proto_pb2.WaitOperationRequest(name=name)),
            (operations.CancelOperation, operations_proto_pb2.CancelOperationRequest(name=name)),
            (operations.DeleteOperation, operations_proto_pb2.DeleteOperationRequest(name=name)),
        )
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as refused:
                method(request, metadata=as_b, timeout=10)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND, method
        listed = operations.ListOperations(
            operations_proto_pb2.ListOperationsRequest(name="jobs"), metadata=as_b, timeout=10
        )
        assert name not in [op.name for op in listed.operations]
        mine = operations.GetOperation(
            operations_proto_pb2.GetOperationRequest(name=name), metadata=as_a, timeout=10
        )
        assert mine.done and mine.name == name
    with _client(tokens_server, token=TOKENS["team-b"]) as b:
        with pytest.raises(grpc.RpcError) as hidden:
            list(b.watch(job.job_id))
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
