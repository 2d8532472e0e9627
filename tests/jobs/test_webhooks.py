"""Webhooks: a job's final state POSTed to its callback, signed per the Standard Webhooks spec
(verified with the `standardwebhooks` package, as a receiver would), delivered at least once
(retries with the same webhook-id, Retry-After honoured, dead-lettered when they run out), only to
URLs --webhook-allow names; on both stores. A real HTTP receiver on a free loopback port."""

from __future__ import annotations

import collections
import ipaddress
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from standardwebhooks.webhooks import Webhook

from tensorgate.client import TensorgateClient
from tensorgate.server.config import ConfigError
from tensorgate.server.jobs.webhooks.policy import AllowList
from tensorgate.server.jobs.webhooks.signing import read_secrets
from tests.harness import ServerThread, wait_until
from tests.receiver import Receiver, new_secret

X = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


@pytest.fixture
def secret(tmp_path: Path) -> tuple[str, Path]:
    value = new_secret()
    path = tmp_path / "webhook-secrets"
    path.write_text(f"# tenant secret\n* {value}\n")
    return value, path


@pytest.fixture
def hook_server(
    start_server: Callable[..., ServerThread], secret: tuple[str, Path]
) -> Callable[..., ServerThread]:
    def start(**overrides: Any) -> ServerThread:
        overrides.setdefault("webhook_allow", ("127.0.0.1",))
        overrides.setdefault("webhook_secrets", str(secret[1]))
        overrides.setdefault("webhook_retry_base_s", 0.05)
        return start_server(**overrides)

    return start


def _delivered(c: TensorgateClient, job_id: str, state: str = "DELIVERY_DELIVERED") -> Any:
    def settled() -> bool:
        delivery = c.get_result(job_id).delivery
        return delivery is not None and delivery.state == state

    wait_until(settled, timeout_s=20, what=f"the webhook of {job_id} {state}")
    return c.get_result(job_id)


def test_a_webhook_is_signed_per_the_spec_and_carries_the_result(
    hook_server: Callable[..., ServerThread], receiver: Receiver, secret: tuple[str, Path]
) -> None:
    running = hook_server()
    with TensorgateClient(running.target, timeout_s=10) as c:
        job = c.submit("mlp", {"input": X}, callback_url=receiver.url, include_result=True)
        result = _delivered(c, job.job_id)
        expected = c.predict("mlp", {"input": X})
    [hook] = receiver.by_id(f"msg_{job.job_id}")
    # The reference library verifies the signature and the timestamp's freshness.
    assert Webhook(secret[0]).verify(hook.body, hook.headers) == hook.json
    with pytest.raises(Exception, match="signature"):
        Webhook(new_secret()).verify(hook.body, hook.headers)
    body = hook.json
    assert body["type"] == "job.succeeded" and body["status"] == "SUCCEEDED"
    assert body["job_id"] == job.job_id and body["model"] == "mlp" and body["error"] is None
    assert body["created_at"] <= body["started_at"] <= body["finished_at"]
    tensors = {t["name"]: t for t in body["outputs"]}
    assert set(tensors) == set(expected)
    for name, array in expected.items():
        assert tensors[name]["datatype"] == "FP32" and tensors[name]["shape"] == list(array.shape)
        np.testing.assert_allclose(
            np.array(tensors[name]["data"], np.float32).reshape(array.shape), array, rtol=1e-6
        )
    assert result.delivery.attempts == 1 and result.delivery.last_error == ""


def test_a_receiver_failing_the_first_attempts_gets_the_same_webhook_id_until_it_answers(
    hook_server: Callable[..., ServerThread], receiver: Receiver, secret: tuple[str, Path]
) -> None:
    receiver.fail_first = 2
    running = hook_server()
    with TensorgateClient(running.target, timeout_s=10) as c:
        job = c.submit("mlp", {"input": X}, callback_url=receiver.url)
        result = _delivered(c, job.job_id)
    attempts = receiver.by_id(f"msg_{job.job_id}")
    assert [a.answered for a in attempts] == [500, 500, 204]
    assert len({a.body for a in attempts}) == 1  # the same message, re-signed each time
    for attempt in attempts:
        Webhook(secret[0]).verify(attempt.body, attempt.headers)
    assert result.delivery.attempts == 3
    # Without include_result the body says where the result is.
    assert attempts[0].json["outputs"] is None
    assert attempts[0].json["result"]["job_id"] == job.job_id


def test_retry_after_is_honoured(
    hook_server: Callable[..., ServerThread], receiver: Receiver
) -> None:
    receiver.fail_first, receiver.retry_after = 1, "1"
    running = hook_server(webhook_retry_base_s=0.01)
    with TensorgateClient(running.target, timeout_s=10) as c:
        job = c.submit("mlp", {"input": X}, callback_url=receiver.url)
        _delivered(c, job.job_id)
    first, second = receiver.by_id(f"msg_{job.job_id}")
    assert second.at - first.at >= 0.95


def test_a_receiver_that_never_answers_ends_dead_lettered_with_its_attempts_visible(
    hook_server: Callable[..., ServerThread], receiver: Receiver
) -> None:
    receiver.hold.set()
    running = hook_server(webhook_timeout_s=0.3, webhook_max_attempts=3)
    with TensorgateClient(running.target, timeout_s=10) as c:
        job = c.submit("mlp", {"input": X}, callback_url=receiver.url)
        result = _delivered(c, job.job_id, "DELIVERY_FAILED")
        [listed] = [j for j in c.list_jobs() if j.job_id == job.job_id]
        [watched] = list(c.watch(job.job_id))
    assert result.status == "SUCCEEDED"  # the job itself succeeded; only its webhook failed
    for delivery in (result.delivery, listed.delivery, watched.delivery):
        assert delivery.state == "DELIVERY_FAILED" and delivery.attempts == 3
        assert "no answer within 0.3 s" in delivery.last_error
    assert len(receiver.by_id(f"msg_{job.job_id}")) == 3


def test_a_failed_delivery_stops_when_its_window_is_over(
    hook_server: Callable[..., ServerThread], receiver: Receiver
) -> None:
    receiver.fail_first = 1000
    running = hook_server(webhook_window_s=0.5, webhook_retry_base_s=0.1)
    with TensorgateClient(running.target, timeout_s=10) as c:
        job = c.submit("mlp", {"input": X}, callback_url=receiver.url)
        result = _delivered(c, job.job_id, "DELIVERY_FAILED")
    assert 1 <= result.delivery.attempts < 8
    assert "HTTP 500" in result.delivery.last_error


def test_a_cancelled_job_is_delivered_with_its_error(
    hook_server: Callable[..., ServerThread], receiver: Receiver, tmp_path: Path, job_store: str
) -> None:
    from tests.jobs.test_watch import _gated, _row

    root = tmp_path / "engines"
    gate = _gated(root)
    running = hook_server(model_repository=root)
    with TensorgateClient(running.target, timeout_s=10) as c:
        for i in range(2):
            c.submit("gated", {"x": _row(1.0 + i)})
        queued = c.submit("gated", {"x": _row(3.0)}, callback_url=receiver.url)
        assert c.cancel(queued.job_id) == "CANCELLED"
        _delivered(c, queued.job_id)
        gate.joinpath("open").touch()
    [hook] = receiver.by_id(f"msg_{queued.job_id}")
    assert hook.json["type"] == "job.cancelled"
    assert hook.json["error"]["code"] == "CANCELLED"


def test_outputs_too_big_for_the_body_are_left_to_get_result(
    hook_server: Callable[..., ServerThread], receiver: Receiver
) -> None:
    running = hook_server(webhook_max_body_bytes=1000)
    with TensorgateClient(running.target, timeout_s=10) as c:
        job = c.submit(
            "mlp", {"input": np.repeat(X, 8, axis=0)}, callback_url=receiver.url,
            include_result=True,
        )  # fmt: skip
        _delivered(c, job.job_id)
    [hook] = receiver.by_id(f"msg_{job.job_id}")
    assert len(hook.body) <= 1000
    assert hook.json["outputs"] is None
    assert "--webhook-max-body-bytes" in hook.json["result"]["reason"]


def test_callbacks_are_refused_at_submit_by_name(
    hook_server: Callable[..., ServerThread],
    start_server: Callable[..., ServerThread],
    receiver: Receiver,
) -> None:
    refusals = {
        "http://10.0.0.1/hook": (grpc.StatusCode.INVALID_ARGUMENT, "--webhook-allow"),
        "http://localhost:1/hook": (grpc.StatusCode.INVALID_ARGUMENT, "--webhook-allow"),
        "ftp://127.0.0.1/hook": (grpc.StatusCode.INVALID_ARGUMENT, "http:// or https://"),
        "http://user:pw@127.0.0.1/": (grpc.StatusCode.INVALID_ARGUMENT, "credentials"),
    }
    running = hook_server()
    with TensorgateClient(running.target, timeout_s=10) as c:
        for url, (code, says) in refusals.items():
            with pytest.raises(grpc.RpcError) as refused:
                c.submit("mlp", {"input": X}, callback_url=url)
            assert refused.value.code() == code, url
            assert says in refused.value.details(), refused.value.details()
        assert c.list_jobs() == [] or all(j.delivery is None for j in c.list_jobs())
    # By default nothing is allowed; and a server without secrets cannot sign.
    plain = start_server()
    with TensorgateClient(plain.target, timeout_s=10) as c:
        with pytest.raises(grpc.RpcError) as refused:
            c.submit("mlp", {"input": X}, callback_url=receiver.url)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sends no webhooks" in refused.value.details()
    unsigned = start_server(webhook_allow=("127.0.0.1",))
    with TensorgateClient(unsigned.target, timeout_s=10) as c:
        with pytest.raises(grpc.RpcError) as refused:
            c.submit("mlp", {"input": X}, callback_url=receiver.url)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--webhook-secrets" in refused.value.details()


def test_a_thousand_jobs_with_callbacks_are_each_delivered(
    hook_server: Callable[..., ServerThread],
    receiver: Receiver,
    job_store: str,
    record_property: Callable[[str, object], None],
) -> None:
    running = hook_server()
    with TensorgateClient(running.target, timeout_s=30) as c:
        ids = [c.submit("mlp", {"input": X}, callback_url=receiver.url).job_id for _ in range(1000)]
    wanted = {f"msg_{job_id}" for job_id in ids}
    wait_until(
        lambda: wanted <= {r.webhook_id for r in receiver.delivered()},
        timeout_s=60,
        what="every webhook delivered",
    )
    counts = collections.Counter(r.webhook_id for r in receiver.delivered())
    duplicates = sum(n - 1 for n in counts.values())
    record_property("duplicate_deliveries", duplicates)
    print(f"1000 jobs ({job_store}): {len(counts)} delivered, {duplicates} duplicates")
    assert set(counts) == wanted


# --- the policy and the secrets file -------------------------------------------------------------


def test_the_allow_list_matches_hosts_ports_domains_and_networks() -> None:
    allow = AllowList(
        ["hooks.example.com", "api.example.net:8443", "*.corp.example", "10.1.0.0/16"]
    )
    assert allow.match("hooks.example.com", 443) is not None
    assert allow.match("HOOKS.example.com.", 80) is not None
    assert allow.match("api.example.net", 8443) is not None
    assert allow.match("api.example.net", 443) is None
    assert allow.match("a.b.corp.example", 443) is not None
    assert allow.match("corp.example.evil", 443) is None
    assert allow.match("10.1.2.3", 80) is not None
    assert allow.match("10.2.0.1", 80) is None
    public, private = ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.1.2.3")
    loopback = ipaddress.ip_address("127.0.0.1")
    # A wildcard reaches public addresses only; a private one needs naming (its network or host).
    assert allow.reaches("a.corp.example", 443, public)
    assert not allow.reaches("a.corp.example", 443, loopback)
    assert allow.reaches("a.corp.example", 443, private)  # 10.1.0.0/16 is named
    assert allow.reaches("hooks.example.com", 443, loopback)  # the exact host is named
    for bad in ("http://x", "a b", "host:99999", "*", "hooks.example.com/path"):
        with pytest.raises(ConfigError, match="--webhook-allow"):
            AllowList([bad])


def test_the_secrets_file_is_checked_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_text(f"team-a {new_secret()}\n* {new_secret()}\n")
    assert set(read_secrets(path)) == {"team-a", "*"}
    for text, says in (
        ("team-a secret\n", "expected 'TENANT whsec_BASE64'"),
        ("team-a whsec_!!!\n", "not base64"),
        ("team-a whsec_c2hvcnQ=\n", "at least 24"),
        (f"a {new_secret()}\na {new_secret()}\n", "listed twice"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=says):
            read_secrets(path)


def test_the_secrets_file_is_re_read_when_it_changes(
    hook_server: Callable[..., ServerThread], receiver: Receiver, secret: tuple[str, Path]
) -> None:
    running = hook_server()
    renewed = new_secret()
    time.sleep(0.01)  # a later modification time than the first file's
    secret[1].write_text(f"* {renewed}\n")
    with TensorgateClient(running.target, timeout_s=10) as c:

        def signed_with_the_new_secret() -> bool:
            job = c.submit("mlp", {"input": X}, callback_url=receiver.url)
            _delivered(c, job.job_id)
            [hook] = receiver.by_id(f"msg_{job.job_id}")
            try:
                Webhook(renewed).verify(hook.body, hook.headers)
                return True
            except Exception:
                return False

        wait_until(signed_with_the_new_secret, timeout_s=15, what="the renewed secret used")
