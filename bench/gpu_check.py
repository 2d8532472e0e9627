"""The GPU path, proven on a lent GPU machine that has no network.

    python -m bench.gpu_check --prepare      # here, with the network: wheels into .gpu-wheels/
    python -m bench.gpu_check --run          # there: installs from .gpu-wheels/ offline, runs

--prepare builds tensorgate's wheel and downloads the wheels of everything it and the GPU tests
need that the GPU machine lacks (Python 3.12, manylinux x86_64, binary only), into an ignored
folder small enough to travel with the working tree. The GPU machine has PyTorch, CuPy, NumPy,
ONNX, ONNX Runtime and cuda-bindings already; the TensorRT runtime is left out (no plan can be
built there).

--run makes a virtual environment that sees the running Python's packages, installs from the folder with
no network, then runs each step, timed, its outcome recorded: the `gpu`-marked tests; the
GPU-instance benchmark (1, 2, 4 instances, answers checked against ONNX Runtime on the CPU);
compute-sanitizer racecheck and memcheck on a short run; a traced request whose `h2d`, `compute`
and `d2h` times come from CUDA events; the multi-process benchmark (--workers; it needs a
redis-server on the PATH, which no wheel provides). Writes gpu_check.json (and into $OUT when set) and prints a
table. Steps that need a GPU are reported as skipped, with the reason, where there is none.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / ".gpu-wheels"
VENV = ROOT / ".gpu-venv"
LIMIT_MIB = 60
# What the GPU machine has already (KINDS.md of the device tool), and what cannot run there.
PRESENT = {
    "numpy", "onnx", "onnxruntime", "cupy-cuda13x", "cuda-bindings", "cuda-pathfinder", "torch",
    "ml-dtypes", "typing-extensions", "protobuf-3", "tensorrt-lean-cu13-bindings",
    "tensorrt-lean-cu13-libs", "fastrlock",
}  # fmt: skip
# Beside the project's base dependencies: the test runner.
EXTRA = ["pytest>=8", "pytest-asyncio>=0.24", "pytest-timeout>=2.3"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prepare", action="store_true", help="download the wheels (network)")
    mode.add_argument("--run", action="store_true", help="install offline and run the checks")
    parser.add_argument("--folder", type=Path, default=FOLDER, help="where the wheels are")
    parser.add_argument(
        "--python-version",
        default="3.12",
        help="--prepare: the GPU machine's Python (another, e.g. 3.11, to rehearse --run here)",
    )
    parser.add_argument(
        "--everything",
        action="store_true",
        help="--prepare: include what the GPU machine has already (for a rehearsal elsewhere)",
    )
    parser.add_argument("--venv", type=Path, default=VENV)
    parser.add_argument("--seconds", type=float, default=5.0, help="--run: per benchmark point")
    args = parser.parse_args()
    return prepare(args) if args.prepare else run(args)


# --- prepare ---------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> int:
    folder: Path = args.folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    print(f"[1/3] building tensorgate's wheel into {folder}", flush=True)
    _pip(
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--wheel-dir",
        str(folder),
        str(ROOT),
    )
    requirements = _base_requirements() + EXTRA
    print(f"[2/3] downloading {len(requirements)} requirements and their dependencies", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        version = args.python_version
        _pip(
            "download", "--quiet", "--only-binary=:all:", "--dest", tmp,
            "--python-version", version, "--implementation", "cp",
            "--abi", f"cp{version.replace('.', '')}", "--abi", "abi3", "--abi", "none",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "--platform", "any",
            *requirements,
        )  # fmt: skip
        kept, left = [], []
        for wheel in sorted(Path(tmp).glob("*.whl")):
            name = wheel.name.split("-")[0].lower().replace("_", "-")
            if not args.everything and name in PRESENT:
                left.append(wheel.name)
                continue
            shutil.move(str(wheel), folder / wheel.name)
            kept.append(wheel.name)
    size_mib = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    print(f"[3/3] {len(kept) + 1} wheels, {size_mib:.1f} MiB in {folder}")
    if left:
        print(f"      left out (the GPU machine has them): {', '.join(left)}")
    if not args.everything and size_mib > LIMIT_MIB:
        print(f"error: {size_mib:.1f} MiB is over the {LIMIT_MIB} MiB that may travel")
        return 1
    print(
        "then, on the GPU machine (the device tool's run): "
        f"carry ['{folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}'], "
        "command 'python3 -m bench.gpu_check --run'"
    )
    return 0


def _base_requirements() -> list[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [r for r in project["dependencies"] if "sys_platform == 'win32'" not in r]


def _pip(*args: str, python: str = sys.executable) -> None:
    subprocess.run([python, "-m", "pip", *args], check=True)


# --- run -------------------------------------------------------------------------------------


class Steps:
    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def run(self, name: str, action: Any) -> dict[str, Any]:
        print(f"[{len(self.results) + 1}] {name}", flush=True)
        started = time.perf_counter()
        try:
            outcome = action()
        except Exception as exc:  # recorded: one step failing must not hide the others
            outcome = {"status": "failed", "detail": f"{type(exc).__name__}: {exc}"}
        outcome["seconds"] = round(time.perf_counter() - started, 1)
        outcome["step"] = name
        self.results.append(outcome)
        print(f"    {outcome['status']}: {str(outcome.get('detail', ''))[:300]}", flush=True)
        return outcome


def run(args: argparse.Namespace) -> int:
    folder: Path = args.folder
    if not folder.is_dir() or not list(folder.glob("tensorgate-*.whl")):
        print(f"error: no wheels in {folder}: run python -m bench.gpu_check --prepare first")
        return 2
    steps = Steps()
    python = str(args.venv / "bin" / "python")

    def install() -> dict[str, Any]:
        if args.venv.exists():
            shutil.rmtree(args.venv)
        subprocess.run([sys.executable, "-m", "venv", str(args.venv)], check=True)
        # The packages of the Python running this (on the GPU machine a venv of its own, with
        # PyTorch and CuPy) stay visible behind the new ones: --system-site-packages would show
        # the base interpreter's instead.
        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        Path(site, "zz_outer_packages.pth").write_text("\n".join(_site_packages()) + "\n")
        [wheel] = folder.glob("tensorgate-*.whl")
        _pip(
            "install", "--quiet", "--no-index", "--find-links", str(folder), str(wheel),
            "pytest", "pytest-asyncio", "pytest-timeout", python=python,
        )  # fmt: skip
        return {"status": "passed", "detail": f"into {args.venv}, offline"}

    if steps.run("install from the folder, offline", install)["status"] != "passed":
        return _report(steps, args)
    reason = _gpu_reason(python)

    def gpu_tests() -> dict[str, Any]:
        # Only the folders holding gpu-marked tests: the others import test-only packages
        # (certificates, Kubernetes schemas) that the GPU machine need not have.
        folders = sorted({str(p.parent.relative_to(ROOT)) for p in _gpu_test_files()})
        done = _run(python, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", *folders)
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        skipped = "skipped" in summary and "passed" not in summary
        status = "skipped" if skipped else ("passed" if done.returncode == 0 else "failed")
        return {"status": status, "detail": summary or done.stderr[-300:]}

    steps.run("gpu-marked tests", gpu_tests)

    def needs_gpu(action: Any) -> Any:
        def guarded() -> dict[str, Any]:
            if reason is not None:
                return {"status": "skipped", "detail": f"no GPU: {reason}"}
            return action()  # type: ignore[no-any-return]

        return guarded

    def instances() -> dict[str, Any]:
        done = _run(python, "-m", "bench.gpu_instances", "--seconds", str(args.seconds))
        figures = _json(ROOT / "bench" / "results" / "gpu_instances.json")
        ok = done.returncode == 0 and not any(r.get("mismatches") for r in figures.get("rows", []))
        return {
            "status": "passed" if ok else "failed",
            "detail": done.stdout[-600:],
            "figures": figures,
        }

    steps.run("GPU instances: 1, 2, 4 (answers vs ONNX Runtime on the CPU)", needs_gpu(instances))

    def sanitizer(tool: str) -> Any:
        def check() -> dict[str, Any]:
            binary = shutil.which("compute-sanitizer")
            if binary is None:
                return {"status": "skipped", "detail": "compute-sanitizer is not on the PATH"}
            done = _run(
                binary, "--tool", tool, "--error-exitcode", "3", python, "-m",
                "bench.gpu_instances", "--seconds", "2", "--instances", "2",
            )  # fmt: skip
            tail = (done.stdout + done.stderr)[-600:]
            return {"status": "passed" if done.returncode == 0 else "failed", "detail": tail}

        return needs_gpu(check)

    steps.run("compute-sanitizer racecheck", sanitizer("racecheck"))
    steps.run("compute-sanitizer memcheck", sanitizer("memcheck"))

    def trace() -> dict[str, Any]:
        done = _run(python, "-m", "bench.gpu_check_trace")
        stages = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else []
        ok = {"h2d", "compute", "d2h"} <= set(stages)
        return {"status": "passed" if ok else "failed", "detail": f"stages: {sorted(set(stages))}"
                + ("" if done.returncode == 0 else done.stderr[-400:])}  # fmt: skip

    steps.run("a traced request: h2d / compute / d2h times from CUDA events", needs_gpu(trace))

    def workers() -> dict[str, Any]:
        redis = shutil.which("redis-server")
        if redis is None:
            return {
                "status": "skipped",
                "detail": "no redis-server on the PATH: --workers > 1 needs the Redis job store "
                "(no wheel carries one; bring a redis-server binary built for that machine)",
            }
        env = {**os.environ, "PATH": f"{Path(redis).parent}{os.pathsep}{os.environ['PATH']}"}
        done = _run(
            python, "-m", "bench.workers", "--workers", "1", "2", "4", "8", "--load-processes",
            "4", "--seconds", str(args.seconds), "--results-only", env=env,
        )  # fmt: skip
        return {
            "status": "passed" if done.returncode == 0 else "failed",
            "detail": done.stdout[-300:] + done.stderr[-300:],
            "figures": _json(ROOT / "bench" / "results" / "workers.json"),
        }

    steps.run("workers: 1, 2, 4, 8 processes on one port", workers)
    return _report(steps, args)


def _gpu_test_files() -> list[Path]:
    return [p for p in (ROOT / "tests").rglob("test_*.py") if "pytest.mark.gpu" in p.read_text()]


def _site_packages() -> list[str]:
    import site

    return [p for p in (*site.getsitepackages(), site.getusersitepackages()) if Path(p).is_dir()]


def _gpu_reason(python: str) -> str | None:
    done = _run(
        python, "-c",
        "from server.backends import cuda; print(cuda.gpu_unavailable_reason() or '')",
    )  # fmt: skip
    if done.returncode != 0:
        return f"cannot ask CUDA: {done.stderr.strip()[-200:]}"
    reason = done.stdout.strip()
    return reason or None


def _run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command), cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env
    )


def _json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


def _report(steps: Steps, args: argparse.Namespace) -> int:
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": platform.node(),
        "python": platform.python_version(),
        "gpu": _gpu_name(),
        "steps": steps.results,
    }
    text = json.dumps(report, indent=2) + "\n"
    out = ROOT / "bench" / "results" / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    print(f"\nGPU check on {report['gpu'] or 'no GPU'}, {report['date']}")
    print("| step | outcome | seconds |\n|---|---|---|")
    for step in steps.results:
        print(f"| {step['step']} | {step['status']} | {step['seconds']} |")
    failed = [s for s in steps.results if s["status"] == "failed"]
    return 1 if failed else 0


def _gpu_name() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ""
    done = subprocess.run(
        [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return done.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
