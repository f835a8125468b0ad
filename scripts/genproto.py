"""Regenerate the Python code for protos/mecbench/{v1,kserve,kubelet} into mecbench/v1, mecbench/kserve
and mecbench/kubelet.

Run: python scripts/genproto.py [--out DIR]

Also writes examples/experiment.schema.json, the JSON Schema of experiment spec files, which
follows ExperimentSpec.

Compiled with `-I protos` so the generated modules import each other as
`from mecbench.v1 import ..._pb2`, with mypy-protobuf stubs beside them. Generated files are
committed; tests/test_protos.py regenerates into a temporary folder and fails if they differ.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
# MECBench's API, and the KServe v2 inference protocol the SUT agent's adapters and the model
# server speak (package `inference`, as the protocol names it).
# And the kubelet's pod-resources API (package `v1`, as the kubelet names it) the node agent reads.
PACKAGE_DIRS = (Path("mecbench") / "v1", Path("mecbench") / "kserve", Path("mecbench") / "kubelet")


def proto_files() -> list[str]:
    return sorted(
        str(p.relative_to(PROTO_ROOT)) for package in PACKAGE_DIRS for p in (PROTO_ROOT / package).glob("*.proto")
    )


def plugin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the dev extras (mypy-protobuf)")
    return found


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *proto_files(),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def write_experiment_schema() -> None:
    """The JSON Schema of spec files follows ExperimentSpec: regenerated with the code."""
    import importlib

    sys.path.insert(0, str(ROOT))
    for name in [m for m in sys.modules if m == "mecbench" or m.startswith("mecbench.")]:
        del sys.modules[name]  # freshly generated code, not what was imported before
    schema = importlib.import_module("mecbench.schema")
    (ROOT / "examples" / schema.SCHEMA_FILE).write_text(schema.experiment_json_schema_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write mecbench/v1 under")
    out = parser.parse_args().out
    generate(out)
    if out.resolve() == ROOT:
        write_experiment_schema()


if __name__ == "__main__":
    main()
