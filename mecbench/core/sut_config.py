"""Validation of SutConfig: every bad value is reported at once, with its field path.

Shared: the controller checks a config when it is asked to deploy it, and the SUT agent again
when it is started with it (the agent can be called directly)."""

from __future__ import annotations

import re

from google.protobuf.duration_pb2 import Duration

from mecbench.core import durations
from mecbench.core.errors import Violations
from mecbench.core.request_env import check_request_env
from mecbench.v1 import common_pb2, sut_agent_pb2

# Ten minutes per sample is far beyond any sensible model of a server; longer is a unit mistake.
MAX_SERVICE_TIME_NS = 600 * 1_000_000_000
MAX_BATCH_SIZE = 65536
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
MAX_ONNX_CONCURRENCY = 256


def _duration(value: Duration, field: str, violations: Violations) -> None:
    if durations.is_negative(value):
        violations.add(field, "must not be negative")
    elif durations.to_ns(value) > MAX_SERVICE_TIME_NS:
        violations.add(field, "must be at most 600s")


def _validate_synthetic(config: sut_agent_pb2.SyntheticBackendConfig, prefix: str, violations: Violations) -> None:
    for name in ("mean", "stddev", "low", "high", "per_sample_time"):
        _duration(getattr(config, name), f"{prefix}.{name}", violations)
    violations.check(
        config.distribution in sut_agent_pb2.ServiceTimeDistribution.values(),
        f"{prefix}.distribution",
        "unknown distribution",
    )
    if config.distribution == sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_UNIFORM:
        violations.check(
            durations.to_ns(config.low) <= durations.to_ns(config.high), f"{prefix}.low", "must not exceed high"
        )
    violations.check(config.max_batch_size <= MAX_BATCH_SIZE, f"{prefix}.max_batch_size", f"at most {MAX_BATCH_SIZE}")
    violations.check(
        config.response_bytes <= MAX_RESPONSE_BYTES, f"{prefix}.response_bytes", f"at most {MAX_RESPONSE_BYTES}"
    )


def _validate_onnxruntime(config: sut_agent_pb2.OnnxRuntimeBackendConfig, prefix: str, violations: Violations) -> None:
    # What needs the model file (input names, shapes, types) is checked when the model loads.
    violations.check(bool(config.model_path), f"{prefix}.model_path", "must name an .onnx file")
    violations.check(
        all(dim > 0 for dim in config.sample_shape), f"{prefix}.sample_shape", "dimensions must be positive"
    )
    violations.check(
        config.data_type in common_pb2.DataType.values() and config.data_type != common_pb2.DATA_TYPE_BYTES,
        f"{prefix}.data_type",
        "must be a numeric type",
    )
    violations.check(
        config.max_concurrency <= MAX_ONNX_CONCURRENCY, f"{prefix}.max_concurrency", f"at most {MAX_ONNX_CONCURRENCY}"
    )
    violations.check(config.max_batch_size <= MAX_BATCH_SIZE, f"{prefix}.max_batch_size", f"at most {MAX_BATCH_SIZE}")
    violations.check(config.intra_op_threads <= 1024, f"{prefix}.intra_op_threads", "at most 1024")


MAX_EXTERNAL_CONCURRENCY = 4096
MAX_READY_TIMEOUT_NS = 3600 * 1_000_000_000


def _validate_external(config: sut_agent_pb2.ExternalBackendConfig, prefix: str, violations: Violations) -> None:
    # The server type's options, and the profile (which lives in the agent's own settings), are
    # checked when the backend is built, before any server starts.
    violations.check(
        bool(config.profile or config.endpoint or config.command), f"{prefix}.endpoint",
        "set an endpoint, or a launch profile",
    )
    violations.check(len(config.command) <= 256 and all(config.command), f"{prefix}.command",
                     "at most 256 arguments, none empty")
    violations.check(bool(config.model), f"{prefix}.model", "must name the model the server serves")
    for name, ceiling in (("ready_timeout", MAX_READY_TIMEOUT_NS), ("request_timeout", MAX_READY_TIMEOUT_NS)):
        value = getattr(config, name)
        if durations.is_negative(value):
            violations.add(f"{prefix}.{name}", "must not be negative")
        elif durations.to_ns(value) > ceiling:
            violations.add(f"{prefix}.{name}", "must be at most 3600s")
    violations.check(
        config.max_concurrency <= MAX_EXTERNAL_CONCURRENCY, f"{prefix}.max_concurrency",
        f"at most {MAX_EXTERNAL_CONCURRENCY}",
    )
    violations.check(config.max_batch_size <= MAX_BATCH_SIZE, f"{prefix}.max_batch_size", f"at most {MAX_BATCH_SIZE}")
    violations.check(config.warmup_requests <= 1000, f"{prefix}.warmup_requests", "at most 1000")


MAX_CLUSTER_WORKERS = 64
MAX_JOIN_TIMEOUT_NS = 3600 * 1_000_000_000
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MEMBER_NAME = re.compile(r"[a-z][a-z0-9-]{0,39}")
HEAD_MEMBER = "head"


def _validate_resources(resources: common_pb2.ResourceLimits, field: str, violations: Violations) -> None:
    violations.check(resources.cpu_cores >= 0, f"{field}.cpu_cores", "must not be negative")


def validate_cluster(config: sut_agent_pb2.SutConfig, prefix: str, violations: Violations) -> None:
    """A cluster SUT: the runtime names an operator's cluster launch profile, the head serves an
    external server (that is what spans the members), every worker has a distinct name."""
    cluster = config.cluster
    violations.check(
        bool(_PROFILE_NAME.fullmatch(cluster.runtime)), f"{prefix}.runtime",
        "must name a cluster launch profile of the SUT agents' configuration (1-64 letters, digits, '_', '.', '-')",
    )
    violations.check(
        config.WhichOneof("backend") == "external", f"{prefix}.runtime",
        "a cluster serves an external server (config.external) on its head",
    )
    violations.check(
        1 <= len(cluster.workers) <= MAX_CLUSTER_WORKERS, f"{prefix}.workers",
        f"a cluster has 1 to {MAX_CLUSTER_WORKERS} workers beside its head",
    )
    seen: set[str] = set()
    for index, worker in enumerate(cluster.workers):
        field = f"{prefix}.workers[{index}]"
        if not MEMBER_NAME.fullmatch(worker.name):
            violations.add(f"{field}.name", "1-40 lowercase letters, digits and '-', starting with a letter")
        elif worker.name == HEAD_MEMBER:
            violations.add(f"{field}.name", f"{HEAD_MEMBER!r} is the head's name")
        elif worker.name in seen:
            violations.add(f"{field}.name", f"another worker is named {worker.name!r}")
        seen.add(worker.name)
        _validate_resources(worker.resources, f"{field}.resources", violations)
        for key in worker.node_selector:
            violations.check(bool(key) and len(key) <= 317, f"{field}.node_selector", "keys are 1-317 characters")
    if durations.is_negative(cluster.join_timeout):
        violations.add(f"{prefix}.join_timeout", "must not be negative")
    elif durations.to_ns(cluster.join_timeout) > MAX_JOIN_TIMEOUT_NS:
        violations.add(f"{prefix}.join_timeout", "must be at most 3600s")


def serves_own_process(config: sut_agent_pb2.SutConfig) -> bool:
    """Whether the config has a served process of its own that `env` reaches: an external server
    the SUT agent starts (a launch profile or a command), or a server image beside the agent."""
    external = config.external if config.WhichOneof("backend") == "external" else None
    return external is not None and bool(external.profile or external.command or config.image)


def validate_config(
    config: sut_agent_pb2.SutConfig,
    prefix: str = "config",
    violations: Violations | None = None,
    env_allowlist: tuple[str, ...] = (),
) -> Violations:
    """Every problem with `config`. `env_allowlist` is the operator's allowlist of the names a
    request may set in the served process's environment (empty: any name that is not reserved)."""
    violations = violations if violations is not None else Violations()
    backend = config.WhichOneof("backend")
    if backend is None:
        violations.add(f"{prefix}.backend", "one of synthetic, onnxruntime, external must be set")
    elif backend == "synthetic":
        _validate_synthetic(config.synthetic, f"{prefix}.synthetic", violations)
    elif backend == "onnxruntime":
        _validate_onnxruntime(config.onnxruntime, f"{prefix}.onnxruntime", violations)
    elif backend == "external":
        _validate_external(config.external, f"{prefix}.external", violations)
    _validate_resources(config.resources, f"{prefix}.resources", violations)
    if config.HasField("cluster"):
        validate_cluster(config, f"{prefix}.cluster", violations)
    if config.env:
        if backend is not None and not serves_own_process(config):
            # Never the agent's own environment: the built-in backends, and a server that is
            # already running, have no process of their own for it to reach.
            violations.add(
                f"{prefix}.env",
                "is the environment of a server the SUT agent starts (an external launch profile or "
                "command, or a server image); this config has none, and the agent's own settings come "
                "only from its operator",
            )
        check_request_env(config.env, f"{prefix}.env", env_allowlist, violations)
    return violations
