"""The model repository: engines/<model>/config.toml, plus the artifact the backend loads, either
beside it (version 1) or in numbered version folders (engines/<model>/<version>/), of which the
model's version_policy picks the ones served."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
from collections.abc import Sequence
from pathlib import Path

from tensorgate.server.config import ConfigError
from tensorgate.server.model_config import MODEL_CONFIG_FILE, ModelConfig


def discover(repository: Path, names: Sequence[str] = ()) -> list[ModelConfig]:
    """Configs of every served version of the named models, or of every model folder when names
    is empty."""
    found = model_folders(repository)
    if names:
        missing = [name for name in names if name not in found]
        if missing:
            raise ConfigError(
                f"model(s) {', '.join(missing)} not in {repository}; "
                f"found: {', '.join(found) or 'none'}"
            )
        found = {name: found[name] for name in names}
    if not found:
        raise ConfigError(
            f"no models in {repository} (a model is a folder with {MODEL_CONFIG_FILE})"
        )
    return [config for folder in found.values() for config in read_model(folder)]


def model_folders(repository: Path) -> dict[str, Path]:
    """Every model folder of the repository, by name."""
    if not repository.is_dir():
        raise ConfigError(
            f"model repository {repository} is not a directory (relative to {Path.cwd()}); "
            f"write the bundled models there with `tensorgate build --out {repository}`, or "
            "point --model-repository at a folder with one sub-folder per model"
        )
    return {
        path.parent.name: path.parent for path in sorted(repository.glob(f"*/{MODEL_CONFIG_FILE}"))
    }


def read_model(folder: Path) -> list[ModelConfig]:
    """The configs of the versions a model's policy serves, oldest first, each stamped. A folder
    without numbered sub-folders is version 1."""
    base = ModelConfig.load(folder)  # config.toml read once: every version shares it
    settings = _settings_digest(folder / MODEL_CONFIG_FILE)
    present = version_folders(folder)
    if not present:
        base.stamp = _stamp(folder, folder, settings, skip_versions=True)
        return [base]
    chosen = base.version_policy.select(list(present))
    if not chosen:
        raise ConfigError(
            f"{folder}: version_policy {_policy(base)} selects none of the versions present "
            f"({', '.join(sorted(present, key=int))})"
        )
    configs = [
        dataclasses.replace(
            base,
            version=version,
            path=present[version],
            stamp=_stamp(folder, present[version], settings),
        )
        for version in chosen
    ]
    unknown = sorted(set(base.traffic) - set(chosen), key=int)
    if unknown:
        raise ConfigError(
            f"{folder}: traffic.weights name version(s) {', '.join(unknown)}, which are not "
            f"served (served: {', '.join(chosen)})"
        )
    return configs


def version_folders(folder: Path) -> dict[str, Path]:
    """The numbered version folders of a model, by version ("1", "2", ...)."""
    return {
        str(int(entry.name)): entry
        for entry in folder.iterdir()
        if entry.is_dir() and entry.name.isdigit() and int(entry.name) >= 1
    }


def _stamp(
    model_dir: Path, version_dir: Path, settings: int, skip_versions: bool = False
) -> tuple[tuple[str, int, int], ...]:
    """What a version is made of: the model's settings (settings: the digest of config.toml
    without its [traffic] table, which changes only the route) and (path, mtime_ns, size) of
    every file of the version."""
    entries = [(MODEL_CONFIG_FILE, settings, 0)]
    for root, dirs, files in os.walk(version_dir):
        if skip_versions and Path(root) == version_dir:
            dirs[:] = [d for d in dirs if not d.isdigit()]
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            path = Path(root) / name
            if path == model_dir / MODEL_CONFIG_FILE:
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((str(path.relative_to(model_dir)), stat.st_mtime_ns, stat.st_size))
    return tuple(sorted(entries))


def _settings_digest(path: Path) -> int:
    settings = tomllib.loads(path.read_text())
    settings.pop("traffic", None)
    text = json.dumps(settings, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _policy(config: ModelConfig) -> str:
    policy = config.version_policy
    if policy.kind == "all":
        return '"all"'
    if policy.kind == "specific":
        return f"{{ specific = [{', '.join(policy.specific)}] }}"
    return f"{{ latest = {policy.latest} }}"
