"""The GPUs a SUT was placed on, made the only ones its served process sees.

The node agent allocates GPUs to the SUT agent's placement and the controller passes their UUIDs
with Start. They go into the agent's own environment before the backend is built: an external
server inherits it, and an in-process backend (ONNX Runtime's CUDA provider) reads it when CUDA
first initialises. UUIDs, never indices: NVML's and CUDA's enumeration orders differ.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping, Sequence

from mecbench.core.errors import Violations

GPU_ENV_NAMES = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
_UUID = re.compile(r"^(GPU|MIG)-[A-Za-z0-9/-]{1,96}$")


def check_visible_gpus(uuids: Sequence[str], field: str = "visible_gpus") -> None:
    violations = Violations()
    for index, value in enumerate(uuids):
        violations.check(bool(_UUID.match(value)), f"{field}[{index}]", "must be a GPU or MIG UUID as NVML names it")
    violations.raise_if_any()


def apply_visible_gpus(uuids: Sequence[str], environ: MutableMapping[str, str] | None = None) -> Mapping[str, str]:
    """Make exactly `uuids` visible to what the agent starts from now on; none given changes
    nothing (the operator's own setting stays). Returns what was set."""
    check_visible_gpus(uuids)
    target = os.environ if environ is None else environ
    if not uuids:
        return {}
    visible = ",".join(uuids)
    for name in GPU_ENV_NAMES:
        target[name] = visible
    return {name: visible for name in GPU_ENV_NAMES}
