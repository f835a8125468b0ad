"""The protos lint clean, the committed generated code matches them, and it imports as a package."""

from __future__ import annotations

import filecmp
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED_PACKAGES = ("v1", "kserve", "kubelet")


@pytest.mark.parametrize("package", GENERATED_PACKAGES)
def test_generated_code_is_fresh(tmp_path: Path, package: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "genproto.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    fresh = tmp_path / "mecbench" / package
    generated = ROOT / "mecbench" / package
    names = sorted(p.name for p in fresh.iterdir())
    committed = sorted(p.name for p in generated.iterdir() if p.suffix in {".py", ".pyi"} and p.name != "__init__.py")
    assert names == committed, "generated file set differs: run `python scripts/genproto.py`"
    stale = [name for name in names if not filecmp.cmp(fresh / name, generated / name, shallow=False)]
    assert not stale, f"stale generated code {stale}: run `python scripts/genproto.py`"


def test_buf_lint_passes() -> None:
    buf = shutil.which("buf", path=str(ROOT / "node_modules" / ".bin")) or shutil.which("buf")
    if buf is None:
        pytest.skip("buf is not installed (scripts/setup installs it with npm)")
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_modules_import_from_installed_package() -> None:
    for name in ("common", "controller", "node_agent", "loadgen_agent", "sut_agent"):
        module = importlib.import_module(f"mecbench.v1.{name}_pb2")
        grpc_module = importlib.import_module(f"mecbench.v1.{name}_pb2_grpc")
        assert module.DESCRIPTOR.package == "mecbench.v1"
        assert grpc_module is not None
    from mecbench.v1 import controller_pb2

    services = controller_pb2.DESCRIPTOR.services_by_name
    assert services["Controller"].full_name == "mecbench.v1.Controller"
    methods = {m.name for m in services["Controller"].methods}
    assert {"InitStorage", "DeploySut", "DeployLoadGenServer", "StartRun", "GetRun", "ListRuns", "WatchRun",
            "CancelRun", "ListNodes", "GetMetrics", "ListResults", "GetResult"} <= methods


def test_wheel_contains_generated_code_and_stubs(tmp_path: Path) -> None:
    """Imports must work from an installed package, not only from the source tree."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    import zipfile

    wheel = next(tmp_path.glob("mecbench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("mecbench/v1/controller_pb2.py", "mecbench/v1/controller_pb2.pyi",
                     "mecbench/v1/controller_pb2_grpc.pyi", "mecbench/py.typed", "controller/server.py",
                     "sut_agent/server.py", "loadgen_agent/server.py", "node_agent/server.py", "store/base.py"):
        assert expected in names, f"{expected} missing from the wheel"
