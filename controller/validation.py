"""Whole-request validation of a RunSpec: every violation is reported at once, with its field
path, before anything is deployed or started."""

from __future__ import annotations

import math

from google.protobuf.duration_pb2 import Duration

from controller.accuracy import validate_accuracy
from mecbench.core.durations import is_negative
from mecbench.core.errors import Violations
from mecbench.core.framing import ADDED_WAIT_FIELDS, ADDED_WAIT_RULE, added_wait_allowed
from mecbench.core.issuing import ISSUE_THREADS_RULE
from mecbench.core.sut_config import validate_config
from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2, sut_agent_pb2
from store.layout import MANIFEST_NAME, check_segment

MAX_CLIENTS = 64
MAX_REPEATS = 100


def _segment_ok(value: str, field: str, violations: Violations) -> None:
    try:
        check_segment(value, field)
    except Exception as exc:  # noqa: BLE001 - InvalidArgument carries the reason
        violations.add(field, str(exc).split(": ", 1)[-1])


def _duration(d: Duration, field: str, violations: Violations) -> None:
    violations.check(not is_negative(d), field, "must not be negative")


def validate_settings(settings: common_pb2.LoadGenSettings, prefix: str, violations: Violations) -> None:
    violations.check(
        settings.scenario != common_pb2.SCENARIO_UNSPECIFIED
        and settings.scenario in common_pb2.Scenario.values(),
        f"{prefix}.scenario",
        "must be one of SINGLE_STREAM, MULTI_STREAM, SERVER, OFFLINE",
    )
    violations.check(
        settings.mode in common_pb2.TestMode.values(), f"{prefix}.mode", "unknown test mode"
    )
    for name in ("min_duration", "max_duration", "server_target_latency", "single_stream_expected_latency",
                 "multi_stream_expected_latency", "ttft_latency", "tpot_latency"):
        _duration(getattr(settings, name), f"{prefix}.{name}", violations)
    violations.check(settings.server_target_qps >= 0, f"{prefix}.server_target_qps", "must not be negative")
    violations.check(settings.offline_expected_qps >= 0, f"{prefix}.offline_expected_qps", "must not be negative")
    violations.check(
        0 <= settings.server_target_latency_percentile <= 100,
        f"{prefix}.server_target_latency_percentile",
        "must be between 0 and 100",
    )
    violations.check(
        0 <= settings.accuracy_log_probability <= 1, f"{prefix}.accuracy_log_probability", "must be between 0 and 1"
    )
    violations.check(
        not settings.server_num_issue_query_threads, f"{prefix}.server_num_issue_query_threads", ISSUE_THREADS_RULE
    )
    if settings.max_query_count and settings.min_query_count:
        violations.check(
            settings.max_query_count >= settings.min_query_count,
            f"{prefix}.max_query_count",
            "must not be below min_query_count",
        )


def validate_sut(config: sut_agent_pb2.SutConfig, prefix: str, violations: Violations) -> None:
    validate_config(config, prefix, violations)


def validate_run_spec(spec: controller_pb2.RunSpec, prefix: str = "spec") -> Violations:
    violations = Violations()
    if not spec.experiment_id:
        violations.add(f"{prefix}.experiment_id", "must not be empty")
    else:
        _segment_ok(spec.experiment_id, f"{prefix}.experiment_id", violations)
    if spec.selector:
        _segment_ok(spec.selector, f"{prefix}.selector", violations)
        violations.check(spec.selector != MANIFEST_NAME, f"{prefix}.selector",
                         f"{MANIFEST_NAME!r} is the name of the experiment's manifest in the store")
    if not spec.sut_id and not spec.HasField("sut"):
        violations.add(f"{prefix}.sut", "set sut_id (a deployed SUT) or sut (a config to deploy)")
    if spec.HasField("sut"):
        validate_sut(spec.sut, f"{prefix}.sut", violations)
    if spec.HasField("accuracy"):
        validate_accuracy(spec.accuracy, f"{prefix}.accuracy", violations)
    if not spec.HasField("settings"):
        violations.add(f"{prefix}.settings", "must be set (at least the scenario)")
    else:
        validate_settings(spec.settings, f"{prefix}.settings", violations)
    violations.check(spec.clients <= MAX_CLIENTS, f"{prefix}.clients", f"at most {MAX_CLIENTS}")
    violations.check(spec.repeats <= MAX_REPEATS, f"{prefix}.repeats", f"at most {MAX_REPEATS}")
    violations.check(
        spec.loadgen_mode in controller_pb2.LoadGenMode.values(), f"{prefix}.loadgen_mode", "unknown mode"
    )
    violations.check(
        spec.busy_policy in controller_pb2.BusyPolicy.values(), f"{prefix}.busy_policy", "unknown policy"
    )
    data_plane = spec.data_plane
    _duration(data_plane.max_batch_delay, f"{prefix}.data_plane.max_batch_delay", violations)
    _duration(data_plane.response_timeout, f"{prefix}.data_plane.response_timeout", violations)
    for name in ADDED_WAIT_FIELDS:
        violations.check(added_wait_allowed(getattr(data_plane, name)), f"{prefix}.data_plane.{name}", ADDED_WAIT_RULE)
    violations.check(data_plane.streams <= 64, f"{prefix}.data_plane.streams", "at most 64")
    if data_plane.HasField("ramp"):
        _check_ramp(spec, prefix, violations)
    if spec.dataset.WhichOneof("source") == "synthetic":
        synthetic = spec.dataset.synthetic
        violations.check(
            all(dim > 0 for dim in synthetic.shape), f"{prefix}.dataset.synthetic.shape", "dimensions must be positive"
        )
    if spec.HasField("network"):
        _check_netem(spec.network.netem, f"{prefix}.network.netem", violations)
    if spec.HasField("cluster_network"):
        _check_netem(spec.cluster_network.netem, f"{prefix}.cluster_network.netem", violations)
        no_cluster = not spec.sut_id and spec.HasField("sut") and not spec.sut.HasField("cluster")
        violations.check(
            not (no_cluster and spec.cluster_network.netem.ByteSize()), f"{prefix}.cluster_network",
            "shapes the links between a cluster SUT's members: spec.sut has no cluster",
        )
    if spec.client_groups:
        _check_groups(spec, prefix, violations)
    return violations


MAX_RAMP_STAGES = 64
MAX_STAGE_RATE = 1e6
MAX_STAGE_CONCURRENCY = 100_000
MAX_STAGE_SECONDS = 24 * 3600


def _check_ramp(spec: controller_pb2.RunSpec, prefix: str, violations: Violations) -> None:
    """A load ramp: the direct client schedules the samples LoadGen issues at once (Offline), in
    stages each of one rate or one concurrency for a positive duration; LoadGen must issue at
    least the samples the rate stages send."""
    data_plane = spec.data_plane
    where = f"{prefix}.data_plane.ramp"
    stages = data_plane.ramp.stages
    violations.check(len(stages) >= 1, f"{where}.stages", "at least one stage")
    violations.check(len(stages) <= MAX_RAMP_STAGES, f"{where}.stages", f"at most {MAX_RAMP_STAGES} stages")
    needed = 0.0
    for index, stage in enumerate(stages):
        field = f"{where}.stages[{index}]"
        rate_ok = math.isfinite(stage.rate) and 0 <= stage.rate <= MAX_STAGE_RATE
        violations.check(rate_ok, f"{field}.rate", f"must be between 0 and {MAX_STAGE_RATE:g}")
        violations.check(
            stage.concurrency <= MAX_STAGE_CONCURRENCY, f"{field}.concurrency", f"at most {MAX_STAGE_CONCURRENCY}"
        )
        if (stage.rate > 0) == (stage.concurrency > 0) and rate_ok:
            violations.add(f"{field}.rate", "set exactly one of rate and concurrency")
        seconds = stage.duration.ToNanoseconds() / 1e9
        violations.check(
            0 < seconds <= MAX_STAGE_SECONDS, f"{field}.duration", f"must be positive, at most {MAX_STAGE_SECONDS} s"
        )
        if rate_ok and 0 < seconds <= MAX_STAGE_SECONDS:
            needed += stage.rate * seconds
    violations.check(
        spec.settings.scenario == common_pb2.SCENARIO_OFFLINE,
        f"{prefix}.settings.scenario",
        "a ramp schedules the samples itself: use SCENARIO_OFFLINE (LoadGen issues them all at once)",
    )
    violations.check(
        data_plane.transport
        not in (loadgen_agent_pb2.DATA_PLANE_TRANSPORT_GRPC, loadgen_agent_pb2.DATA_PLANE_TRANSPORT_TCP),
        f"{prefix}.data_plane.transport",
        "a ramp is applied by the direct client: DATA_PLANE_TRANSPORT_DIRECT (or unset)",
    )
    violations.check(
        data_plane.max_in_flight == 0, f"{prefix}.data_plane.max_in_flight", "not with a ramp: its stages set it"
    )
    violations.check(
        spec.settings.min_query_count >= math.ceil(needed - 1e-9),
        f"{prefix}.settings.min_query_count",
        f"must be at least {math.ceil(needed - 1e-9)}, the requests the ramp's rate stages send",
    )


def _check_netem(netem: common_pb2.NetemConfig, prefix: str, violations: Violations) -> None:
    for name in ("delay", "jitter"):
        _duration(getattr(netem, name), f"{prefix}.{name}", violations)
    for name in ("loss_percent", "reorder_percent", "duplicate_percent", "corrupt_percent"):
        value = getattr(netem, name)
        violations.check(0 <= value <= 100, f"{prefix}.{name}", "must be between 0 and 100")


def _check_groups(spec: controller_pb2.RunSpec, prefix: str, violations: Violations) -> None:
    """Client groups: named uniquely, at least one client each, their sum the run's clients."""
    names: set[str] = set()
    for index, group in enumerate(spec.client_groups):
        where = f"{prefix}.client_groups[{index}]"
        if not group.name:
            violations.add(f"{where}.name", "must not be empty")
        elif not group.name.replace("-", "").replace("_", "").isalnum() or len(group.name) > 40:
            violations.add(f"{where}.name", "1-40 letters, digits, '-' or '_'")
        elif group.name in names:
            violations.add(f"{where}.name", f"{group.name!r} names another group too")
        names.add(group.name)
        violations.check(group.clients >= 1, f"{where}.clients", "at least 1")
        if group.HasField("network"):
            _check_netem(group.network.netem, f"{where}.network.netem", violations)
    total = sum(g.clients for g in spec.client_groups)
    violations.check(total <= MAX_CLIENTS, f"{prefix}.client_groups", f"at most {MAX_CLIENTS} clients in all")
    violations.check(not spec.clients or spec.clients == total, f"{prefix}.clients",
                     f"must be 0 or the groups' sum ({total})")
    violations.check(not spec.HasField("network"), f"{prefix}.network",
                     "not with client_groups: each group has its own network")
