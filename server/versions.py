"""One model's versions and the route between them (the model set keeps one per name).

A request naming a version goes to it; a chunk of a live sequence goes to the version the
sequence started on; anything else takes the default route: split by the weights of the model's
[traffic] table, or all to the highest version. Versions replaced by a reload, or unloaded, are
retiring: no new request reaches them, what they were given finishes on them, and the model set
releases them once idle.
"""

from __future__ import annotations

import bisect
import itertools
import random

from tensorgate.server.errors import NotFound, clip
from tensorgate.server.model import ServedModel
from tensorgate.server.records import SequenceControl


class ModelVersions:
    def __init__(self, name: str) -> None:
        self.name = name
        # The versions requests are routed to, oldest first.
        self.serving: dict[str, ServedModel] = {}
        # Versions taken out of the route, finishing what they were given.
        self.retiring: list[ServedModel] = []
        self.traffic: dict[str, int] = {}
        self._split: list[str] = []  # versions of the weighted default route
        self._bounds: list[int] = []  # their cumulative weights

    def route_to(self, versions: dict[str, ServedModel], traffic: dict[str, int]) -> None:
        """Makes these the served versions (at once: a request is routed by the old map or the
        new one, never between them)."""
        self.serving = dict(sorted(versions.items(), key=lambda item: int(item[0])))
        self.traffic = dict(traffic)  # as configured
        split = {v: w for v, w in traffic.items() if v in self.serving and w > 0}
        self._split = list(split)
        self._bounds = list(itertools.accumulate(split.values()))

    @property
    def primary(self) -> ServedModel:
        """The highest served version: what describes the model where no version is named."""
        return next(reversed(self.serving.values()))

    def default(self) -> ServedModel:
        """The default route's pick for one request."""
        if not self._bounds:
            return self.primary
        point = random.random() * self._bounds[-1]
        return self.serving[self._split[bisect.bisect_right(self._bounds, point)]]

    def version(self, version: str) -> ServedModel:
        model = self.serving.get(version)
        if model is None:
            served = ", ".join(self.serving) or "none"
            raise NotFound(
                f"model '{self.name}' has no version '{clip(version)}' served; "
                f"served versions: {served}"
            )
        return model

    def route(
        self, version: str, tenant: str = "", sequence: SequenceControl | None = None
    ) -> ServedModel:
        """The version one request goes to."""
        if version:
            return self.version(version)
        if sequence is not None and not sequence.start:
            for model in self.every():
                if model.holds_sequence(tenant, sequence.sequence_id):
                    return model  # a sequence stays on the version it started on
        return self.default()

    def every(self) -> list[ServedModel]:
        """Serving and retiring versions alike."""
        return [*self.serving.values(), *self.retiring]

    @property
    def ready(self) -> bool:
        return any(model.ready for model in self.serving.values())
