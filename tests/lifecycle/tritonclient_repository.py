"""Runs in the tritonclient environment (tests/api): the repository extension through the real
tritonclient, against a server with `scaled` (versions 1, and 2 on disk not yet loaded) and
`other`.

    python tritonclient_repository.py 127.0.0.1:PORT > results.json
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main(target: str) -> dict[str, object]:
    client = grpcclient.InferenceServerClient(target)
    out: dict[str, object] = {}
    index = client.get_model_repository_index(as_json=True)["models"]
    out["index"] = index
    client.unload_model("other")
    out["after_unload"] = client.get_model_repository_index(as_json=True)["models"]
    try:
        out["other_ready_after_unload"] = client.is_model_ready("other")
    except InferenceServerException as exc:
        out["other_ready_after_unload"] = exc.status()
    client.load_model("other")
    after = client.get_model_repository_index(as_json=True)["models"]
    out["after_load"] = {
        "other": [
            {"version": m["version"], "state": m["state"]} for m in after if m["name"] == "other"
        ]
    }
    client.load_model("scaled")  # picks up version 2 from disk
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    out["scaled_after_reload"] = float(client.infer("scaled", [x]).as_numpy("y")[0, 0])
    try:
        client.load_model("nope")
        out["load_unknown"] = "no error"
    except InferenceServerException as exc:
        out["load_unknown"] = exc.message()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
