"""serve's start-up: a port in use, a base install without the pipeline, the providers line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_runtime import cli
from edge_runtime.engines.providers import provider_report

# Makes the named modules unimportable in a child process: a base install as on a device.
BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"rich", "torch", "transformers", "optimum"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


def test_a_port_in_use_is_one_line_before_anything_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        started = time.monotonic()
        # The bundle does not even exist: the port is checked first.
        code = cli.main(["serve", "--bundle", str(tmp_path / "nope"), "--port", str(port)])
    _, err = capsys.readouterr()
    assert code == 1 and err.count("\n") == 1, err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
    assert time.monotonic() - started < 5


def _base_install_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "EDGE_RUNTIME_CACHE": str(tmp_path / "cache")}


@pytest.mark.parametrize(
    "argv",
    [["edge-runtime", "serve", "--port", "0"], ["edge-build", "demo", "--out", "OUT"]],
)
def test_a_base_install_says_what_to_install_in_one_line(
    tmp_path: Path, argv: list[str]
) -> None:
    exe = Path(sys.executable).with_name(argv[0])
    args = [str(tmp_path / "b") if a == "OUT" else a for a in argv[1:]]
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60,
                          check=False, env=_base_install_env(tmp_path))
    err = [line for line in proc.stderr.splitlines() if " INFO " not in line]
    assert proc.returncode == 1, proc.stderr
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "pip install 'edge-runtime[build]'" in err[0] and "rich" in err[0]
    assert not (tmp_path / "b").exists()


def test_the_providers_line_says_why_a_gpu_provider_is_missing() -> None:
    import onnxruntime as ort

    report = provider_report()
    built = set(ort.get_available_providers())
    assert report.version == ort.__version__
    assert "CPUExecutionProvider" in report.offered
    for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        if p not in built:
            assert report.missing[p].startswith("not in this build")
            assert f"{p}: not in this build" in report.line()
        else:
            assert p in report.offered or "cannot be loaded" in report.missing[p]
