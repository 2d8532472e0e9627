"""The models that come with tensorgate, and the builder that writes them into a model repository
(`tensorgate build`, or `python build_engines.py` in a checkout).

Each bundled model is a folder under models/ holding its hand-written config.toml (and, for the
python model, its model.py); a model with a graph in graphs.py also gets its artifact,
model.onnx, built from code with fixed seeds. The wheel carries these folders, so a user with no
checkout builds the same repository the checkout's `make serve` serves.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from tensorgate.server.bundled.graphs import BENCH_MODELS, GRAPHS, BuildError

__all__ = ["BENCH_MODELS", "BUNDLED", "MODELS_DIR", "STATEFUL", "BuildError", "build"]

MODELS_DIR = Path(__file__).resolve().parent / "models"
# The bundled models, in the order they are built.
BUNDLED = tuple(sorted(path.parent.name for path in MODELS_DIR.glob("*/config.toml")))
# Stateful models run on CPU instances only in this release: no TensorRT plan is built for them.
STATEFUL = frozenset({"silero_vad"})


def build(name: str, out: Path, force: bool = False) -> Path:
    """Writes the model's folder into the repository `out`: its bundled files (each only where
    none is there yet, so a config you edited stays; force: overwrite) and its built artifact.
    Returns the artifact, or the folder for a model without one."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    if name in BENCH_MODELS:
        graph, config = BENCH_MODELS[name]
        (folder / "config.toml").write_text(config)
        onnx.save(graph(), folder / "model.onnx")
        return folder / "model.onnx"
    source = MODELS_DIR / name
    if not source.is_dir():
        raise BuildError(f"no bundled model '{name}'; bundled: {', '.join(BUNDLED)}")
    for path in sorted(source.iterdir()):
        target = folder / path.name
        if path.is_file() and path.suffix in (".toml", ".py") and (force or not target.exists()):
            shutil.copyfile(path, target)
    if name not in GRAPHS:
        return folder
    artifact = folder / "model.onnx"
    onnx.save(GRAPHS[name](), artifact)
    return artifact
