"""Shell commands that call a running server: predict, submit, result, cancel, stream, models,
health, vad.

Inputs: --input NAME=@file.npy, --input 'NAME=[[1,2],[3,4]]' (JSON, typed from the model's
metadata), or --random-rows N for random inputs shaped from the model's metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.client import codec
from tensorgate.client.results import Delivery, JobResult, StreamItem, TensorMetadata
from tensorgate.client.security import Security
from tensorgate.client.sequences import SequenceError
from tensorgate.client.sync import TensorgateClient


def add_client_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument(
        "--target",
        default=os.environ.get("TENSORGATE_TARGET", "localhost:50051"),
        help="server address (env TENSORGATE_TARGET; default localhost:50051)",
    )
    target.add_argument("--timeout-s", type=float, default=30.0)
    target.add_argument(
        "--tls-ca", default=os.environ.get("TENSORGATE_TLS_CA", ""), help="PEM CA: connect with TLS"
    )
    target.add_argument(
        "--tls-cert",
        default=os.environ.get("TENSORGATE_TLS_CERT", ""),
        help="PEM client certificate (mutual TLS)",
    )
    target.add_argument(
        "--tls-key", default=os.environ.get("TENSORGATE_TLS_KEY", ""), help="its private key"
    )
    target.add_argument(
        "--token",
        default=os.environ.get("TENSORGATE_TOKEN", ""),
        help="bearer token (env TENSORGATE_TOKEN)",
    )

    request = argparse.ArgumentParser(add_help=False)
    request.add_argument("--model", default="mlp")
    request.add_argument("--input", action="append", default=[], metavar="NAME=@FILE.npy|JSON")
    request.add_argument("--random-rows", type=_rows, default=0, metavar="N")
    request.add_argument("--seed", type=int, default=0)
    request.add_argument("--outputs", default="", help="comma-separated output names")

    request.add_argument(
        "--model-version", default="", help="the version to run (default: the model's route)"
    )
    predict = commands.add_parser("predict", parents=[target, request], help="one unary Predict")
    predict.set_defaults(func=_predict)

    submit = commands.add_parser("submit", parents=[target, request], help="submit a job")
    submit.add_argument("--idempotency-key", default="")
    submit.add_argument(
        "--callback-url", default="", help="POST the final state there (a signed webhook)"
    )
    submit.add_argument(
        "--include-result", action="store_true", help="put the outputs in the webhook's body"
    )
    submit.set_defaults(func=_submit)

    watch = commands.add_parser(
        "watch", parents=[target], help="follow a job: one line per state change, to the end"
    )
    watch.add_argument("job_id")
    # A watch lasts as long as the job: no deadline unless --timeout-s is given.
    watch.set_defaults(func=_watch, timeout_s=None)

    result = commands.add_parser("result", parents=[target], help="a job's status and result")
    result.add_argument("job_id")
    result.add_argument("--wait-s", type=float, default=0.0, help="long-poll this long")
    result.set_defaults(func=_result)

    jobs = commands.add_parser(
        "jobs", parents=[target], help="list jobs; --status FAILED shows the dead letters"
    )
    jobs.add_argument("--status", default="", help="PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED")
    jobs.add_argument("--limit", type=int, default=100)
    jobs.set_defaults(func=_jobs)

    cancel = commands.add_parser("cancel", parents=[target], help="cancel a job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=_cancel)

    stream = commands.add_parser(
        "stream", parents=[target, request], help="send requests on one StreamPredict stream"
    )
    stream.add_argument("--count", type=int, default=4, help="requests to send")
    stream.set_defaults(func=_stream)

    models = commands.add_parser(
        "models",
        parents=[target],
        help="list models and their I/O; index, load NAME, unload NAME: the model repository",
    )
    models.add_argument(
        "action",
        nargs="?",
        choices=("list", "index", "load", "unload"),
        default="list",
        help="list (default): served models; index: the repository; load/unload NAME",
    )
    models.add_argument("name", nargs="?", default="", help="the model to load or unload")
    models.set_defaults(func=_models)

    health = commands.add_parser(
        "health", parents=[target], help="grpc.health.v1 status; exit 0 only when SERVING"
    )
    health.add_argument("--service", default="", help='"" (the server) or a model name')
    health.set_defaults(func=_health)

    vad = commands.add_parser(
        "vad",
        parents=[target],
        help="stream a 16 kHz mono WAV to silero_vad and print speech segments as they close",
    )
    vad.add_argument("wav", metavar="FILE.wav")
    vad.add_argument(
        "--speed", type=float, default=1.0, help="times real time (0: as fast as answered)"
    )
    vad.add_argument("--model", default="silero_vad")
    vad.add_argument("--threshold", type=float, default=0.5, help="speech probability")
    vad.add_argument("--min-silence-ms", type=float, default=300, help="silence that ends speech")
    vad.add_argument("--min-speech-ms", type=float, default=250, help="shorter speech is ignored")
    vad.add_argument("--json", action="store_true", help="one JSON object per segment")
    vad.set_defaults(func=_vad)


def _rows(value: str) -> int:
    try:
        rows = int(value)
    except ValueError:
        rows = -1
    if rows < 1:
        raise argparse.ArgumentTypeError(f"expected a number of rows >= 1, got {value!r}")
    return rows


def _security(args: argparse.Namespace) -> Security:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together: give both")
    return Security(args.tls_ca, args.tls_cert, args.tls_key, args.token)


def _call(args: argparse.Namespace, action: Any) -> int:
    try:
        security = _security(args)
        client = TensorgateClient(args.target, timeout_s=args.timeout_s, security=security)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            action(client)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


def _inputs(client: TensorgateClient, args: argparse.Namespace) -> dict[str, np.ndarray]:
    metadata = client.model_metadata(args.model)
    specs = {t.name: t for t in metadata.inputs}
    rng = np.random.default_rng(args.seed)
    inputs: dict[str, np.ndarray] = {}
    if args.random_rows:
        for spec in metadata.inputs:
            shape = (args.random_rows, *(d if d > 0 else 1 for d in spec.shape[1:]))
            dtype = codec.numpy_dtype(spec.datatype)
            if dtype.kind == "f":
                inputs[spec.name] = rng.standard_normal(shape).astype(dtype)
            else:
                inputs[spec.name] = rng.integers(0, 2 if dtype.kind == "b" else 10, shape).astype(
                    dtype
                )
    for item in args.input:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--input {item!r}: expected NAME=@FILE.npy or NAME=JSON")
        if value.startswith("@"):
            inputs[name] = _load_npy(name, value[1:])
        else:
            known = specs.get(name)
            typed = codec.numpy_dtype(known.datatype) if known else None
            try:
                inputs[name] = np.asarray(json.loads(value), dtype=typed)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"--input {name}=…: not JSON ({exc.msg} at character {exc.pos}); give a "
                    f"JSON array such as {name}='[[0.5, 1.0]]', or {name}=@file.npy"
                ) from None
            except (TypeError, ValueError):
                kind = known.datatype if known else "numbers"
                raise ValueError(
                    f"--input {name}=…: input '{name}' takes {kind}, and the JSON holds "
                    "something else (a string, or rows of different lengths); give e.g. "
                    f"{name}='[[0.5, 1.0]]'"
                ) from None
    if not inputs and args.random_rows and not metadata.inputs:
        return inputs  # a model that is not ready: the server's answer says why
    if not inputs:
        raise ValueError("no inputs: give --input NAME=... or --random-rows N")
    return inputs


def _load_npy(name: str, path: str) -> np.ndarray:
    try:
        array: np.ndarray = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"--input {name}=@{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"--input {name}=@{path}: not a .npy array file ({exc})") from None
    return array


def _outputs_arg(args: argparse.Namespace) -> list[str]:
    return [name for name in args.outputs.split(",") if name]


def _show(outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {
        name: {"shape": list(array.shape), "dtype": str(array.dtype), "data": array.tolist()}
        for name, array in outputs.items()
    }


def _predict(args: argparse.Namespace) -> int:
    def action(client: TensorgateClient) -> None:
        outputs = client.predict(
            args.model,
            _inputs(client, args),
            outputs=_outputs_arg(args),
            model_version=args.model_version,
        )
        print(json.dumps(_show(outputs)))

    return _call(args, action)


def _submit(args: argparse.Namespace) -> int:
    def action(client: TensorgateClient) -> None:
        job = client.submit(
            args.model,
            _inputs(client, args),
            outputs=_outputs_arg(args),
            idempotency_key=args.idempotency_key,
            callback_url=args.callback_url,
            include_result=args.include_result,
            model_version=args.model_version,
        )
        print(json.dumps({
            "job_id": job.job_id,
            "status": job.status,
            "estimated_wait_s": round(job.estimated_wait_s, 6),
            "deduplicated": job.deduplicated,
        }))  # fmt: skip

    return _call(args, action)


def _job_json(result: JobResult) -> dict[str, Any]:
    shown: dict[str, Any] = {"job_id": result.job_id, "status": result.status}
    if result.outputs is not None:
        shown["outputs"] = _show(result.outputs)
    if result.error_code is not None:
        shown["error"] = {"code": result.error_code.name, "message": result.error_message}
    if result.finished:
        shown["expires_in_s"] = round(result.expires_in_s, 1)
    if result.delivery is not None:
        shown["delivery"] = _delivery_json(result.delivery)
    return shown


def _result(args: argparse.Namespace) -> int:
    def action(client: TensorgateClient) -> None:
        print(json.dumps(_job_json(client.get_result(args.job_id, args.wait_s))))

    return _call(args, action)


def _watch(args: argparse.Namespace) -> int:
    def action(client: TensorgateClient) -> None:
        for event in client.watch(args.job_id):
            shown: dict[str, Any] = {
                "job_id": event.job_id,
                "status": event.status,
                "attempt": event.attempt,
                "time": round(event.time, 3),
            }
            if event.retry:
                shown["retry"] = True
            if event.error_code is not None:
                shown["error"] = {"code": event.error_code.name, "message": event.error_message}
            if event.outputs is not None:
                shown["outputs"] = _show(event.outputs)
            if event.delivery is not None:
                shown["delivery"] = _delivery_json(event.delivery)
            print(json.dumps(shown), flush=True)

    return _call(args, action)


def _delivery_json(delivery: Delivery) -> dict[str, Any]:
    shown: dict[str, Any] = {"state": delivery.state, "attempts": delivery.attempts}
    if delivery.last_error:
        shown["last_error"] = delivery.last_error
    return shown


def _jobs(args: argparse.Namespace) -> int:
    def action(client: TensorgateClient) -> None:
        for job in client.list_jobs(args.status.upper(), args.limit):
            shown: dict[str, Any] = {
                "job_id": job.job_id,
                "model": job.model,
                "status": job.status,
                "attempts": job.attempts,
                "age_s": round(job.age_s, 1),
            }
            if job.error_code is not None:
                shown["error"] = {"code": job.error_code.name, "message": job.error_message}
            if job.delivery is not None:
                shown["delivery"] = _delivery_json(job.delivery)
            print(json.dumps(shown))

    return _call(args, action)


def _cancel(args: argparse.Namespace) -> int:
    def action(client: TensorgateClient) -> None:
        print(json.dumps({"job_id": args.job_id, "status": client.cancel(args.job_id)}))

    return _call(args, action)


def _stream(args: argparse.Namespace) -> int:
    def action(client: TensorgateClient) -> None:
        inputs = _inputs(client, args)
        items = [
            StreamItem(id=f"req-{i}", model=args.model, inputs=inputs, outputs=_outputs_arg(args))
            for i in range(args.count)
        ]
        for result in client.stream(items):
            if result.ok:
                assert result.outputs is not None
                print(json.dumps({"id": result.id, "outputs": _show(result.outputs)}))
            else:
                assert result.error_code is not None
                print(json.dumps({
                    "id": result.id,
                    "error": {"code": result.error_code.name, "message": result.error_message},
                }))  # fmt: skip

    return _call(args, action)


def _vad(args: argparse.Namespace) -> int:
    import asyncio
    import uuid
    from pathlib import Path

    from tensorgate.client.aio import AsyncTensorgateClient
    from tensorgate.client.vad import Segmenter, WavError, read_wav, stream_vad

    try:
        samples = read_wav(Path(args.wav))
        security = _security(args)
    except (WavError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.speed < 0:
        print("error: --speed must be >= 0", file=sys.stderr)
        return 2

    async def run() -> None:
        segmenter = Segmenter(args.threshold, args.min_silence_ms, args.min_speech_ms)
        async with AsyncTensorgateClient(
            args.target, timeout_s=args.timeout_s, security=security
        ) as client:
            stream = stream_vad(client, samples, f"vad-{uuid.uuid4().hex[:12]}", args.speed,
                                segmenter, args.model)  # fmt: skip
            async for _, _, segment in stream:
                if segment is None:
                    continue
                if args.json:
                    print(json.dumps({"start_s": segment.start_s, "end_s": segment.end_s}))
                else:
                    print(f"speech {segment.start_s:8.3f} s – {segment.end_s:8.3f} s "
                          f"({segment.end_s - segment.start_s:.2f} s)", flush=True)  # fmt: skip

    try:
        asyncio.run(run())
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except SequenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _models(args: argparse.Namespace) -> int:
    if args.action in ("load", "unload") and not args.name:
        print(f"tensorgate models {args.action}: name the model", file=sys.stderr)
        return 2
    if args.action != "list":
        return _call(args, lambda client: _repository(client, args.action, args.name))

    def action(client: TensorgateClient) -> None:
        for summary in client.list_models():
            shown: dict[str, Any] = {
                "name": summary.name,
                "backend": summary.backend,
                "ready": summary.ready,
                "versions": list(summary.versions),
            }
            if summary.traffic:
                shown["traffic"] = dict(summary.traffic)
            if summary.ready:
                meta = client.model_metadata(summary.name)
                shown["max_batch_size"] = meta.max_batch_size
                shown["inputs"] = [_tensor_meta(t) for t in meta.inputs]
                shown["outputs"] = [_tensor_meta(t) for t in meta.outputs]
            print(json.dumps(shown))

    return _call(args, action)


def _repository(client: TensorgateClient, action: str, name: str) -> None:
    if action == "index":
        for entry in client.repository_index():
            shown = {"name": entry.name, "version": entry.version, "state": entry.state}
            if entry.reason:
                shown["reason"] = entry.reason
            print(json.dumps(shown))
    elif action == "load":
        client.load_model(name, timeout_s=600)
        versions = next((m.versions for m in client.list_models() if m.name == name), ())
        print(json.dumps({"name": name, "loaded": True, "versions": list(versions)}))
    else:
        client.unload_model(name)
        print(json.dumps({"name": name, "unloaded": True}))


def _health(args: argparse.Namespace) -> int:
    try:
        security = _security(args)
        channel = (
            grpc.secure_channel(args.target, security.channel_credentials())
            if security.tls
            else grpc.insecure_channel(args.target)
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s
            )
        except grpc.RpcError as exc:
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                details = (
                    f"the server reports no health service named {args.service!r}; "
                    "try '' (the server), a model name or tensorgate.jobs"
                )
                if args.service.startswith("tensorgate.worker."):
                    details += (
                        ". With --workers N each worker process answers only its own name, and "
                        "each connection reaches one worker: ask again (a new connection may "
                        "reach another), or ask for '' to check the server as a whole"
                    )
            print(f"error: {exc.code().name}: {details}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(json.dumps({"service": args.service, "status": status}))
    return 0 if status == "SERVING" else 1


def _tensor_meta(tensor: TensorMetadata) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
