"""Builds the bundled models into this checkout's model repository, engines/ (what `make serve`
serves): `tensorgate build --out engines`, for those who run from a checkout. The builder itself
is server/bundled/ (see its command.py for the flags):

    python build_engines.py                  # every bundled model into engines/
    python build_engines.py --only mlp       # one model
    python build_engines.py --out /tmp/repo  # another repository
    python build_engines.py --tensorrt       # also a TensorRT plan of each: engines/<name>_trt/
"""

from __future__ import annotations

import sys
from pathlib import Path

from tensorgate.server.bundled import MODELS_DIR, build
from tensorgate.server.bundled.command import main

ENGINES = Path(__file__).resolve().parent / "engines"

__all__ = ["ENGINES", "MODELS_DIR", "build", "main"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], out=ENGINES, prog="build_engines"))
