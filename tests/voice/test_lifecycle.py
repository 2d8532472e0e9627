"""The lifecycle and limits of sequences, on silero_vad_small (max_sequences 4, idle timeout
1 s): the limit, the idle timeout, sequence_end, streams that close or whose caller goes away,
unknown sequences, restarts, and malformed chunks. Every refusal names what was wrong."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorgate.client import AsyncTensorgateClient, SequenceError, TensorgateClient
from tests.harness import ServerThread, wait_until
from tests.voice.audio import Recording
from tests.voice.conftest import reference, start_voice_server, voices

SMALL = "silero_vad_small"
ROOT = Path(__file__).resolve().parents[2]


def _live(server: ServerThread, model: str = SMALL) -> int:
    async def read() -> int:
        return server.server.models[model].live_sequences

    return server.call(read())


@pytest.fixture
def chunks(recording: Recording) -> np.ndarray:
    return voices(recording, 1)[0]


@pytest.fixture
def clean(voice_server: ServerThread) -> ServerThread:
    """The small model with no live sequence left by an earlier test (they end by idling)."""
    wait_until(lambda: _live(voice_server) == 0, 5, "no live sequences")
    return voice_server


def _predict(client: TensorgateClient, chunk: np.ndarray, sequence_id: str, **flags: bool) -> float:
    outputs = client.predict(SMALL, {"audio": chunk}, sequence_id=sequence_id, **flags)
    return float(outputs["probability"][0, 0])


def test_max_sequences_then_resource_exhausted(clean: ServerThread, chunks: np.ndarray) -> None:
    with TensorgateClient(clean.target, timeout_s=30) as client:
        for i in range(4):
            _predict(client, chunks[0], f"limit-{i}", sequence_start=True)
        with pytest.raises(grpc.RpcError) as refused:
            _predict(client, chunks[0], "limit-4", sequence_start=True)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4 live sequences, its max_sequences" in (refused.value.details() or "")
        # The live ones go on; ending one makes room.
        _predict(client, chunks[1], "limit-0", sequence_end=True)
        assert _live(clean) == 3
        _predict(client, chunks[0], "limit-4", sequence_start=True)
        assert _live(clean) == 4


def test_an_idle_sequence_is_freed_and_a_late_chunk_says_why(
    clean: ServerThread, chunks: np.ndarray
) -> None:
    with TensorgateClient(clean.target, timeout_s=30) as client:
        _predict(client, chunks[0], "idle-1", sequence_start=True)
        assert _live(clean) == 1
        wait_until(lambda: _live(clean) == 0, 5, "the idle sequence to be freed")
        with pytest.raises(grpc.RpcError) as late:
            _predict(client, chunks[1], "idle-1")
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = late.value.details() or ""
    assert "sequence 'idle-1'" in details and "no chunk for 1 s" in details
    assert "idle_timeout_ms" in details and "sequence_start" in details


def test_sequence_end_frees_it(clean: ServerThread, chunks: np.ndarray) -> None:
    with TensorgateClient(clean.target, timeout_s=30) as client:
        _predict(client, chunks[0], "ends", sequence_start=True)
        _predict(client, chunks[1], "ends", sequence_end=True)
        assert _live(clean) == 0
        with pytest.raises(grpc.RpcError) as after:
            _predict(client, chunks[2], "ends")
    assert after.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ended with sequence_end" in (after.value.details() or "")


def test_an_unknown_sequence_needs_sequence_start(clean: ServerThread, chunks: np.ndarray) -> None:
    with TensorgateClient(clean.target, timeout_s=30) as client:
        with pytest.raises(grpc.RpcError) as unknown:
            _predict(client, chunks[0], "never-started")
    assert unknown.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (unknown.value.details() or "") == (
        f"sequence 'never-started' is not live on model '{SMALL}': its first chunk must set "
        "sequence_start"
    )


def test_sequence_start_on_a_live_id_restarts_it(clean: ServerThread, chunks: np.ndarray) -> None:
    expected = reference(chunks[:10])
    with TensorgateClient(clean.target, timeout_s=30) as client:
        first = [_predict(client, c, "again", sequence_start=t == 0) for t, c in
                 enumerate(chunks[:10])]  # fmt: skip
        again = [_predict(client, c, "again", sequence_start=t == 0) for t, c in
                 enumerate(chunks[:10])]  # fmt: skip
        _predict(client, chunks[10], "again", sequence_end=True)
    np.testing.assert_allclose(first, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(again, expected, atol=1e-4, rtol=0)


def test_a_closed_stream_frees_its_sequences(clean: ServerThread, chunks: np.ndarray) -> None:
    async def drive() -> None:
        async with AsyncTensorgateClient(clean.target, timeout_s=30) as client:
            async with client.sequences(SMALL) as stream:
                for i in range(3):
                    await stream.send(f"closed-{i}", {"audio": chunks[0]}, start=True)
                assert _live(clean) == 3
            # Half-closed, answered, ended: freed with no sequence_end.

    asyncio.run(drive())
    wait_until(lambda: _live(clean) == 0, 5, "the stream's sequences to be freed")
    with TensorgateClient(clean.target, timeout_s=30) as client:
        with pytest.raises(grpc.RpcError) as late:
            _predict(client, chunks[1], "closed-0")
    assert "its stream ended" in (late.value.details() or "")


def test_a_departed_caller_frees_its_sequences(clean: ServerThread, chunks: np.ndarray) -> None:
    """A client process killed mid-stream: its sequences are freed once gRPC sees it gone."""
    code = textwrap.dedent(f"""
        import asyncio, sys, numpy as np
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "protos")!r}]
        from tensorgate.client import AsyncTensorgateClient
        async def main():
            async with AsyncTensorgateClient({clean.target!r}) as client:
                async with client.sequences({SMALL!r}) as stream:
                    silence = {{"audio": np.zeros((1, 512), np.float32)}}
                    for i in range(2):
                        await stream.send(f"gone-{{i}}", silence, start=True)
                    print("started", flush=True)
                    await asyncio.sleep(60)
        asyncio.run(main())
    """)
    caller = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert caller.stdout is not None and caller.stdout.readline().strip() == "started"
        assert _live(clean) == 2
        caller.kill()
        caller.wait(10)
        wait_until(lambda: _live(clean) == 0, 10, "the departed caller's sequences to be freed")
    finally:
        caller.kill()


def test_malformed_chunks_are_refused_by_name(clean: ServerThread, chunks: np.ndarray) -> None:
    with TensorgateClient(clean.target, timeout_s=30) as client:
        with pytest.raises(grpc.RpcError) as no_id:
            client.predict(SMALL, {"audio": chunks[0]})
        assert no_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is stateful" in (no_id.value.details() or "")
        assert "needs a sequence_id" in (no_id.value.details() or "")
        with pytest.raises(grpc.RpcError) as two_rows:
            client.predict(SMALL, {"audio": np.zeros((2, 512), np.float32)}, sequence_id="rows",
                           sequence_start=True)  # fmt: skip
        assert two_rows.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "a chunk of a sequence is one row; this one has 2" in (
            two_rows.value.details() or ""
        )
        with pytest.raises(grpc.RpcError) as short:
            client.predict(SMALL, {"audio": np.zeros((1, 320), np.float32)}, sequence_id="short",
                           sequence_start=True)  # fmt: skip
        assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "[-1,512]" in (short.value.details() or "")
        with pytest.raises(grpc.RpcError) as flags:
            client.predict(SMALL, {"audio": chunks[0]}, sequence_start=True)
        assert "sequence_start/sequence_end need a sequence_id" in (flags.value.details() or "")
        with pytest.raises(grpc.RpcError) as job:
            client.submit(SMALL, {"audio": chunks[0]})
        assert job.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "its sequences run through Predict or StreamPredict" in (job.value.details() or "")
    assert _live(clean) == 0  # nothing refused was started


def test_a_failed_chunk_on_a_stream_leaves_the_others_going(
    clean: ServerThread, chunks: np.ndarray
) -> None:
    async def drive() -> list[float]:
        async with AsyncTensorgateClient(clean.target, timeout_s=30) as client:
            async with client.sequences(SMALL) as stream:
                good = [await stream.send("going", {"audio": chunks[0]}, start=True)]
                with pytest.raises(SequenceError) as unknown:
                    await stream.send("not-started", {"audio": chunks[0]})
                assert unknown.value.code == grpc.StatusCode.FAILED_PRECONDITION
                for t in range(1, 5):
                    good.append(await stream.send("going", {"audio": chunks[t]}, end=t == 4))
        return [float(g["probability"][0, 0]) for g in good]

    np.testing.assert_allclose(asyncio.run(drive()), reference(chunks[:5]), atol=1e-4, rtol=0)


def test_shutdown_answers_every_accepted_chunk(voice_repository: Path, chunks: np.ndarray) -> None:
    """SIGTERM-like stop with sequences mid-flight: chunks queued behind their sequence's running
    chunk still run, in order, within the grace period; none is lost."""
    running = start_voice_server(voice_repository, models=("silero_vad",))
    stopped = False
    try:
        accepted: list[int] = []

        async def drive() -> list[list[Any]]:
            async with AsyncTensorgateClient(running.target, timeout_s=30) as client:
                stream = client.sequences("silero_vad")
                await stream.__aenter__()
                # 8 sequences of 30 chunks: a backlog of well over 60 waiting chunks forms
                # however fast this machine runs them.
                sent = [
                    [stream.submit(f"stop-{s}", {"audio": chunks[t]}, start=t == 0)
                     for s in range(8)]
                    for t in range(30)
                ]  # fmt: skip
                futures = [[sent[t][s] for t in range(30)] for s in range(8)]
                # Stop once the server holds many chunks waiting behind their sequence's
                # running one.
                while (held := running.queued("silero_vad")) < 60 and not sent[-1][-1].done():
                    await asyncio.sleep(0.001)
                accepted.append(held)
                stop = asyncio.get_running_loop().run_in_executor(None, running.stop, 3.0)
                results = [await asyncio.gather(*row, return_exceptions=True) for row in futures]
                await stop  # the open stream holds the server for the grace period
                await stream.close()
                return results

        results = asyncio.run(drive())
        stopped = True
    finally:
        if not stopped:
            running.stop()
    expected = reference(chunks[:30])
    # Every chunk the server held when the stop began was answered.
    assert sum(isinstance(r, dict) for row in results for r in row) >= accepted[0] >= 60
    for row in results:
        answered = [r for r in row if isinstance(r, dict)]
        # Answered chunks are a prefix of the sequence, with the reference's values; the rest
        # were refused as the server stopped, not lost.
        assert all(isinstance(r, dict) for r in row[: len(answered)])
        got = [float(r["probability"][0, 0]) for r in answered]
        np.testing.assert_allclose(got, expected[: len(got)], atol=1e-4, rtol=0)
        for refused in row[len(answered) :]:
            assert isinstance(refused, SequenceError), refused
            assert refused.code == grpc.StatusCode.UNAVAILABLE, refused


def test_tenants_do_not_share_sequences(
    voice_repository: Path, chunks: np.ndarray, tmp_path: Path
) -> None:
    """Two tenants using the same sequence_id hold two sequences: neither sees the other's."""
    import hashlib

    from tensorgate.client import Security

    tokens = {"team-a": "token-of-team-a", "team-b": "token-of-team-b"}
    (tmp_path / "tokens").write_text("".join(
        f"{tenant} {hashlib.sha256(token.encode()).hexdigest()}\n"
        for tenant, token in tokens.items()
    ))  # fmt: skip
    running = start_voice_server(
        voice_repository, models=(SMALL,), auth_tokens=str(tmp_path / "tokens")
    )
    try:
        a = TensorgateClient(
            running.target, timeout_s=30, security=Security(token=tokens["team-a"])
        )
        b = TensorgateClient(
            running.target, timeout_s=30, security=Security(token=tokens["team-b"])
        )
        with a, b:
            first_a = _predict(a, chunks[0], "call-1", sequence_start=True)
            with pytest.raises(grpc.RpcError) as other:
                _predict(b, chunks[1], "call-1")  # team-a's call-1 is not team-b's
            assert other.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "is not live" in (other.value.details() or "")
            # team-b's own call-1, fed other audio, runs beside team-a's without mixing state.
            got_b = [_predict(b, chunks[20 + t], "call-1", sequence_start=t == 0)
                     for t in range(5)]  # fmt: skip
            got_a = [first_a] + [_predict(a, chunks[t], "call-1") for t in range(1, 5)]
            assert _live(running) == 2
    finally:
        running.stop()
    np.testing.assert_allclose(got_a, reference(chunks[:5]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_b, reference(chunks[20:25]), atol=1e-4, rtol=0)
