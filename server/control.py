"""Model control: how the served models follow the repository while the server runs
(--model-control).

- none (the default): the models and versions found at start serve until the server stops; the
  repository API's load and unload answer FAILED_PRECONDITION.
- poll: every --repository-poll-s the repository is read again; added, removed and changed
  versions and configs are applied (a changed version is loaded beside the one serving and takes
  over once warm), added models are loaded and removed ones unloaded.
- explicit: only the repository API (RepositoryModelLoad / RepositoryModelUnload, `tensorgate
  models load|unload`) changes what is served.

Every change goes through the model set (ModelSet.apply / remove), which keeps what serves
untouched when a new version fails to load. Under --workers every worker polls for itself; an
API call reaches one worker, which appends the change to a file all workers follow
(control_log), so every worker applies it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from tensorgate.server.config import ConfigError
from tensorgate.server.errors import FailedPrecondition, InvalidArgument, NotFound
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.models import ModelLoadError, ModelSet
from tensorgate.server.records import RepositoryEntry
from tensorgate.server.repository import model_folders, read_model

log = logging.getLogger(__name__)

MODES = ("none", "poll", "explicit")


class ModelControl:
    def __init__(
        self,
        models: ModelSet,
        mode: str = "none",
        repository: Path | None = None,
        names: Sequence[str] = (),
        poll_s: float = 5.0,
        on_added: Callable[[str], None] | None = None,
        on_removed: Callable[[str], None] | None = None,
        control_log: str = "",
    ) -> None:
        """names: the models to serve (--models; empty: every model of the repository).
        on_added / on_removed: a model started or stopped being served (the job lanes follow)."""
        self.mode = mode
        self._models = models
        self._repository = repository
        self._names = tuple(names)
        self._poll_s = poll_s
        self._on_added = on_added or (lambda name: None)
        self._on_removed = on_removed or (lambda name: None)
        self._task: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._log = Path(control_log) if control_log else None
        # The stamps of a model's versions that last failed to load (poll does not retry them
        # until the files change) and the error last logged for a model (logged once).
        self._failed: dict[str, tuple[object, ...]] = {}
        self._logged: dict[str, str] = {}

    async def start(self) -> None:
        if self.mode == "poll":
            self._task = asyncio.create_task(self._poll(), name="repository-poll")
        if self.mode == "explicit" and self._log is not None:
            self._follower = asyncio.create_task(self._follow(), name="control-log")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, self._follower) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the repository API ---------------------------------------------------------------------

    async def index(self) -> list[RepositoryEntry]:
        entries = self._models.states()
        loaded = {entry.name for entry in entries}
        try:
            # The repository is read off the loop (a folder listing per call).
            folders = (
                await asyncio.to_thread(model_folders, self._repository) if self._repository else {}
            )
        except ConfigError:
            folders = {}
        for name in sorted(set(folders) - loaded):
            reason = self._models.load_failures.get(name, "not loaded")
            entries.append(RepositoryEntry(name, "", "UNAVAILABLE", reason))
        return sorted(entries, key=lambda e: (e.name, int(e.version or 0)))

    async def load(self, name: str) -> list[str]:
        """Loads the model, or reloads it from the repository as it now is; returns the versions
        loaded (none when nothing changed)."""
        self._check_controlled("load")
        folder = await self._folder(name)
        try:
            configs = await asyncio.to_thread(read_model, folder)
        except ConfigError as exc:
            raise InvalidArgument(f"model '{name}' cannot be loaded: {exc}") from None
        try:
            loaded = await self._apply(name, configs)
        except ModelLoadError as exc:
            raise FailedPrecondition(str(exc)) from None
        self._tell_workers("load", name)
        return loaded

    async def unload(self, name: str) -> None:
        self._check_controlled("unload")
        if name not in self._models:
            raise NotFound(f"model '{name}' is not loaded")
        await self._models.remove(name)
        self._on_removed(name)
        self._tell_workers("unload", name)

    # --- the other workers ----------------------------------------------------------------------

    def _tell_workers(self, action: str, name: str) -> None:
        if self._log is None:
            return
        with self._log.open("a") as log_file:  # one short line: appended whole
            log_file.write(f"{os.getpid()} {action} {name}\n")

    async def _follow(self) -> None:
        """Applies what the other workers' API calls changed (and, for a worker started late,
        what they changed before it started)."""
        assert self._log is not None
        offset = 0
        while True:
            try:
                text = await asyncio.to_thread(_read_from, self._log, offset)
            except OSError:
                text = ""
            offset += len(text.encode())
            for line in text.splitlines():
                pid, action, name = line.split(" ", 2)
                if int(pid) == os.getpid():
                    continue
                try:
                    if action == "load":
                        folder = await self._folder(name)
                        configs = await asyncio.to_thread(read_model, folder)
                        await self._apply(name, configs)
                    elif name in self._models:
                        await self._models.remove(name)
                        self._on_removed(name)
                except Exception as exc:
                    log.error("model %s: %s from another worker not applied: %s", name, action, exc)
            await asyncio.sleep(0.2)

    def _check_controlled(self, what: str) -> None:
        if self.mode == "none":
            raise FailedPrecondition(
                f"the server does not {what} models while it runs (--model-control none); "
                "start it with --model-control explicit or poll"
            )

    async def _folder(self, name: str) -> Path:
        if self._repository is None:
            raise NotFound(f"model '{name}' is not in the model repository")
        folders = await asyncio.to_thread(model_folders, self._repository)
        if name not in folders:
            raise NotFound(
                f"model '{name}' is not in the model repository {self._repository}; "
                f"found: {', '.join(folders) or 'none'}"
            )
        return folders[name]

    async def _apply(self, name: str, configs: list[ModelConfig]) -> list[str]:
        new = name not in self._models
        loaded = await self._models.apply(name, configs)
        if new:
            self._on_added(name)
        return loaded

    # --- polling --------------------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self.sync()
            except Exception:
                log.exception("repository poll failed")

    async def sync(self) -> None:
        """Applies what changed in the repository since it was last read."""
        assert self._repository is not None
        try:
            folders = await asyncio.to_thread(model_folders, self._repository)
        except ConfigError as exc:
            self._log_once("", str(exc))
            return
        if self._names:
            folders = {n: f for n, f in folders.items() if n in self._names}
        for name in list(self._models):
            if name not in folders:
                log.info("model %s: gone from the repository; unloading", name)
                await self._models.remove(name)
                self._on_removed(name)
        for name, folder in folders.items():
            try:
                configs = await asyncio.to_thread(read_model, folder)
            except (ConfigError, OSError) as exc:
                self._log_once(name, f"model {name}: not applied: {exc}")
                continue
            stamps = {c.version: c.stamp for c in configs}
            traffic = configs[-1].traffic if configs else {}
            if (stamps, traffic) == self._models.stamps(name):
                continue
            key = (tuple(sorted(stamps.items())), tuple(sorted(traffic.items())))
            if self._failed.get(name) == key:
                continue  # failed as it is: tried again once its files change
            try:
                await self._apply(name, configs)
                self._failed.pop(name, None)
                self._logged.pop(name, None)
            except ModelLoadError as exc:
                self._failed[name] = key
                log.error("%s", exc)

    def _log_once(self, name: str, message: str) -> None:
        if self._logged.get(name) != message:
            self._logged[name] = message
            log.error("%s", message)


def _read_from(path: Path, offset: int) -> str:
    """The complete lines of a file from a byte offset on."""
    with path.open("rb") as file:
        file.seek(offset)
        data = file.read()
    end = data.rfind(b"\n") + 1
    return data[:end].decode()
