"""The model repository: engines/<model>/config.toml plus the artifact the backend loads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tensorgate.server.config import ConfigError
from tensorgate.server.model_config import MODEL_CONFIG_FILE, ModelConfig


def discover(repository: Path, names: Sequence[str] = ()) -> list[ModelConfig]:
    """Configs of the named models, or of every model folder when names is empty."""
    if not repository.is_dir():
        raise ConfigError(
            f"model repository {repository} is not a directory (relative to {Path.cwd()}); "
            f"write the bundled models there with `tensorgate build --out {repository}`, or "
            "point --model-repository at a folder with one sub-folder per model"
        )
    found = {
        path.parent.name: path.parent for path in sorted(repository.glob(f"*/{MODEL_CONFIG_FILE}"))
    }
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
    return [ModelConfig.load(path) for path in found.values()]
