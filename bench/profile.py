"""Where the server's time goes at saturation: py-spy samples the `tensorgate serve` process while
the load generator drives unary Predict at a given concurrency, then the samples are ranked by
function (inclusive and self time). Prints the ranks and keeps the collapsed stacks in
docs/profile.collapsed.txt (speedscope or flamegraph.pl draw them).

    python -m bench.profile --concurrency 64 --seconds 15
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from bench.loadgen import LoadSpec, run  # noqa: E402
from bench.serverproc import ServeProcess  # noqa: E402
from tensorgate.server.bundled import build  # noqa: E402


def _frame_name(frame: str) -> str:
    """'handler (server/api/unary.py:52)' -> 'server/api/unary.py:handler'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{name}"


def rank(collapsed: Path, top: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]], int]:
    inclusive: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")[1:]]  # first entry: the thread
        if not frames:
            continue
        total += count
        for name in set(frames):
            inclusive[name] += count
        self_time[frames[-1]] += count
    pct = lambda c: [(n, 100.0 * v / total) for n, v in c.most_common(top)]  # noqa: E731
    return pct(inclusive), pct(self_time), total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="sample every thread, not only the one holding the GIL (the server's real limit)",
    )
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        build("mlp", Path(tmp))
        server = ServeProcess(Path(tmp), ("mlp",))
        collapsed = Path(tmp) / "profile.txt"
        (ROOT / "docs").mkdir(exist_ok=True)
        try:
            record = [py_spy, "record", "--pid", str(server.process.pid), "--rate", "200",
                      "--duration", str(int(args.seconds)), "--nonblocking"]  # fmt: skip
            if not args.all_threads:
                record.append("--gil")
            sampler = threading.Thread(
                target=subprocess.run,
                args=([*record, "--format", "raw", "-o", str(collapsed)],),
                kwargs={"capture_output": True},
            )
            sampler.start()
            result = run(LoadSpec(server.target, "mlp", concurrency=args.concurrency,
                                  seconds=args.seconds - 2, warmup_s=1.0, processes=2))  # fmt: skip
            sampler.join()
        finally:
            server.stop()
        print(f"load: {result.req_per_s:.0f} req/s, p99 {result.p99_ms:.1f} ms at concurrency "
              f"{args.concurrency}")  # fmt: skip
        inclusive, self_time, total = rank(collapsed, args.top)
        print(f"\n{total} samples. Inclusive (a function and everything it calls):")
        for name, share in inclusive:
            print(f"  {share:5.1f}%  {name}")
        print("\nSelf (time in the function's own code):")
        for name, share in self_time:
            print(f"  {share:5.1f}%  {name}")
        shutil.copyfile(collapsed, ROOT / "docs" / "profile.collapsed.txt")
        print(f"\nwrote {ROOT / 'docs' / 'profile.collapsed.txt'} (collapsed stacks; "
              "flamegraph.pl or speedscope draw them)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
