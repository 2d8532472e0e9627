"""Prints the spans of one Predict, one StreamPredict and one job, as a collector would receive
them, with start offsets, durations and each request's stage times (used for the README's
example).

    python -m bench.trace_example
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import numpy as np
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from tensorgate.client import AsyncTensorgateClient, StreamItem  # noqa: E402
from tensorgate.server.app import TensorgateServer  # noqa: E402
from tensorgate.server.bundled import build  # noqa: E402
from tensorgate.server.config import ServerConfig  # noqa: E402
from tensorgate.server.telemetry import Tracing  # noqa: E402

SHOWN = ("model", "request_id", "job.id", "job.status")
STAGES = ("validate", "queue", "execute", "encode")
BATCH = ("batch.id", "batch.size", "batch.requests", "instance", "h2d", "compute", "d2h")


def render(spans: list[ReadableSpan]) -> str:
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    ids = {s.context.span_id for s in spans}
    for span in spans:
        parent = span.parent.span_id if span.parent and span.parent.span_id in ids else None
        by_parent.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(span: ReadableSpan, depth: int, origin: int) -> None:
        attrs = span.attributes or {}
        shown = " ".join(
            f"{k}={attrs['tensorgate.' + k]}" for k in SHOWN if "tensorgate." + k in attrs
        )
        if "rpc.grpc.status_code" in attrs:
            shown += f" rpc.grpc.status_code={attrs['rpc.grpc.status_code']}"
        if span.links:
            shown += f" links={len(span.links)}"
        start_ms = (span.start_time - origin) / 1e6  # type: ignore[operator]
        duration_ms = (span.end_time - span.start_time) / 1e6  # type: ignore[operator]
        lines.append(f"{'  ' * depth}{span.name:<{44 - 2 * depth}} +{start_ms:7.3f} ms "
                     f"{duration_ms:7.3f} ms  {shown}".rstrip())  # fmt: skip
        stages = [f"{n} {attrs[f'tensorgate.{n}_ms']:.3f}" for n in STAGES
                  if f"tensorgate.{n}_ms" in attrs]  # fmt: skip
        if stages:
            batch = " ".join(
                f"{k}={_short(attrs.get('tensorgate.' + k, attrs.get(f'tensorgate.{k}_ms')))}"
                for k in BATCH
                if "tensorgate." + k in attrs or f"tensorgate.{k}_ms" in attrs
            )
            lines.append(f"{'  ' * (depth + 1)}ms: {' → '.join(stages)}")
            lines.append(
                f"{'  ' * (depth + 1)}queue.depth={attrs.get('tensorgate.queue.depth')} {batch}"
            )
        for child in sorted(by_parent.get(span.context.span_id, []), key=lambda s: s.start_time):
            walk(child, depth + 1, origin)

    roots = sorted(by_parent.get(None, []), key=lambda s: s.start_time)  # type: ignore[arg-type, return-value]
    for root in roots:
        walk(root, 0, root.start_time)  # type: ignore[arg-type]
    return "\n".join(lines)


def _short(value: object) -> str:
    return (
        f"{value:.3f}"
        if isinstance(value, float)
        else f"{value:x}"
        if isinstance(value, int) and value > 2**32
        else str(value)
    )


async def main() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tempfile.TemporaryDirectory() as tmp:
        build("mlp", Path(tmp))
        config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, model_repository=Path(tmp))
        server = TensorgateServer(config, Tracing(provider))
        await server.start()
        x = np.ones((1, 256), np.float32)
        async with AsyncTensorgateClient(f"127.0.0.1:{server.port}") as c:
            await c.predict("mlp", {"input": x}, request_id="r-1")
            exporter.clear()
            await c.predict("mlp", {"input": x}, request_id="r-2")
            print("# Predict\n" + render(list(exporter.get_finished_spans())))
            exporter.clear()
            items = [StreamItem(f"s{i}", "mlp", {"input": x}) for i in range(2)]
            [r async for r in c.stream(items)]
            print(
                "\n# StreamPredict with 2 requests\n" + render(list(exporter.get_finished_spans()))
            )
            exporter.clear()
            job = await c.submit("mlp", {"input": x})
            await c.get_result(job.job_id, wait_timeout_s=5)
            print("\n# Submit + GetResult\n" + render(list(exporter.get_finished_spans())))
        await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
