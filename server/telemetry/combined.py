"""One /metrics for several serving processes (--workers): each worker serves its own registry on
a loopback port, and this endpoint scrapes them all at scrape time and adds the samples up.

Counters and histograms add; gauges of per-process state (queue depth, instances, open streams)
add; `tensorgate_jobs` describes the shared job store that every worker reads alike, so it takes
the largest value instead. `tensorgate_workers` counts the workers that answered.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tensorgate.server.telemetry.metrics import SCRAPE_THREADS, ScrapeServer

# Families that describe something shared by the workers, not a part each of them holds.
_SHARED = {"tensorgate_jobs"}
_SCRAPE_TIMEOUT_S = 2.0


def merge(texts: Iterable[str]) -> str:
    """Prometheus text expositions, added up sample by sample (see the module doc)."""
    kinds: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            kinds.setdefault(family.name, (family.type, family.documentation))
            samples = values.setdefault(family.name, {})
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # a time, not an amount
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if family.name in _SHARED:
                    samples[key] = max(samples.get(key, sample.value), sample.value)
                else:
                    samples[key] = samples.get(key, 0.0) + sample.value
    lines = []
    for name, (kind, documentation) in kinds.items():
        if not values[name]:
            continue
        lines.append(f"# HELP {name} {_escape(documentation)}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, labels), value in values[name].items():
            rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            selector = f"{sample_name}{{{rendered}}}" if labels else sample_name
            lines.append(f"{selector} {_number(value)}")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


class CombinedMetrics:
    """The supervisor's endpoint; endpoints() names the workers' own /metrics URLs now."""

    def __init__(self, endpoints: Callable[[], list[str]]) -> None:
        self._endpoints = endpoints
        self._server: ScrapeServer | None = None

    def serve(self, port: int, host: str) -> int:
        server = ScrapeServer((host, port), SCRAPE_THREADS)
        server.set_app(self._app)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self._server = server
        return int(server.server_port)

    def scrape(self) -> str:
        texts = []
        for url in self._endpoints():
            try:
                with urllib.request.urlopen(url, timeout=_SCRAPE_TIMEOUT_S) as reply:
                    texts.append(reply.read().decode())
            except OSError:
                continue  # a worker being replaced: the others still count
        workers = (
            "# HELP tensorgate_workers Serving processes that answered this scrape\n"
            f"# TYPE tensorgate_workers gauge\ntensorgate_workers {len(texts)}\n"
        )
        return merge([*texts, workers])

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = self.scrape().encode()
        start_response(
            "200 OK",
            [("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
             ("Content-Length", str(len(body)))],
        )  # fmt: skip
        return [body]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
