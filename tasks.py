#!/usr/bin/env python3
"""Developer entry points that need nothing but python3:

    python3 tasks.py demo    generate the sample models and serve them (prints curl/tritonclient)
    python3 tasks.py test    ruff + the whole test suite
    python3 tasks.py bench   the serving benchmark (bench/serving.py)

Each creates `.venv` with the project and its test dependencies on first use, and installs the
Debian packages the tests talk to (Mosquitto, wrk, h2load and nghttp, curl, systemd-analyze) when
run as root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".edgefleet-installed"
# binary -> Debian package providing it
SYSTEM_TOOLS = {
    "mosquitto": "mosquitto",
    "wrk": "wrk",
    "h2load": "nghttp2-client",  # h2load and nghttp: HTTP/2 clients of the gRPC tests and bench
    "nghttp": "nghttp2-client",
    "curl": "curl",
    "systemd-analyze": "systemd",
}


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def run(*cmd, **kw) -> None:
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def ensure_venv() -> None:
    if not PY.exists():
        say(f"creating {VENV}")
        try:
            venv.EnvBuilder(with_pip=True).create(VENV)
        except (subprocess.CalledProcessError, OSError) as exc:
            shutil.rmtree(VENV, ignore_errors=True)
            if os.geteuid() == 0 and shutil.which("apt-get"):
                apt_install(["python3-venv"])
                venv.EnvBuilder(with_pip=True).create(VENV)
            else:
                sys.exit(f"cannot create a virtualenv ({exc}); install python3-venv and retry")
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    say("installing edgefleet and its test dependencies into .venv (first run takes a while)")
    run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(PY, "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test]")
    STAMP.write_text(digest)


def apt_install(packages: list[str]) -> None:
    say(f"installing Debian packages: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-qq", env=env)
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages, env=env)


def ensure_system_tools(tools: dict[str, str] = SYSTEM_TOOLS) -> None:
    missing = sorted({pkg for tool, pkg in tools.items() if not _have(tool)})
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        apt_install(missing)
    else:
        sys.exit(f"missing system packages: {' '.join(missing)} (sudo apt-get install them)")


def _have(tool: str) -> bool:
    return bool(shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists())


def demo() -> int:
    ensure_venv()
    models = ROOT / "demo-models"
    run(PY, "-m", "agent.cli", "sample-models", models)
    http, grpc = "127.0.0.1:8000", "127.0.0.1:8001"
    data = ",".join(["0.5"] * 64)
    print(
        f"""
EdgeFleet agent demo: serving {models} on REST http://{http} and gRPC {grpc}  (Ctrl-C stops)

  curl -s http://{http}/v2/models/mlp
  curl -s http://{http}/v2/models/mlp/config        # Triton's model configuration
  curl -s -X POST http://{http}/v2/models/mlp/infer -H 'Content-Type: application/json' \\
    -d '{{"inputs":[{{"name":"input","shape":[1,64],"datatype":"FP32","data":[{data}]}}]}}'

  .venv/bin/python - <<'PY'
import numpy as np, tritonclient.grpc as tc
c = tc.InferenceServerClient("{grpc}")
x = tc.InferInput("input", [1, 3, 224, 224], "FP32")
x.set_data_from_numpy(np.random.rand(1, 3, 224, 224).astype(np.float32))
print(c.infer("cnn", [x]).as_numpy("output").argmax())
print(c.get_inference_statistics("cnn", as_json=True))
PY
""",
        flush=True,
    )
    os.execv(
        PY,
        [
            str(PY),
            "-m",
            "agent.cli",
            "serve",
            "--models",
            str(models),
            "--http",
            http,
            "--grpc",
            grpc,
        ],
    )


def test() -> int:
    ensure_venv()
    ensure_system_tools()
    say("ruff")
    run(PY, "-m", "ruff", "check", ROOT)
    run(PY, "-m", "ruff", "format", "--check", ROOT)
    say("pytest")
    return subprocess.run([str(PY), "-m", "pytest", "-q", *sys.argv[2:]], cwd=ROOT).returncode


def bench() -> int:
    ensure_venv()
    ensure_system_tools()
    return subprocess.run([str(PY), str(ROOT / "bench" / "serving.py"), *sys.argv[2:]]).returncode


def main() -> int:
    tasks = {"demo": demo, "test": test, "bench": bench}
    if len(sys.argv) < 2 or sys.argv[1] not in tasks:
        print(__doc__)
        return 2
    return tasks[sys.argv[1]]()


if __name__ == "__main__":
    sys.exit(main())
