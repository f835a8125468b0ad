"""Experiments: one spec in, a complete, comparable set of measurements out.

An experiment is validated as a whole (every violation, with its field path, at once), expanded
into points (scenario x clients x network profile x target QPS), and each point runs as a run
(with the spec's repeats) through the RunManager, one after another so points never share the
SUT. A peak search adds, per network profile and client count, a bisection over Server runs
for the highest QPS LoadGen still judges VALID at the latency bound.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from controller import webhooks
from controller.accuracy import validate_accuracy
from controller.groups import apply_mix, mix_points
from controller.registry import ACTIVE_STATES
from controller.runs import TERMINAL_STATES, RunManager, now
from controller.shaping import is_shaped
from controller.validation import MAX_CLIENTS, validate_run_spec
from mecbench.core import durations
from mecbench.core.errors import Cancelled, FailedPrecondition, InvalidArgument, MecbenchError, NotFound, Violations
from mecbench.core.logging import get_logger
from mecbench.core.path_options import relayed
from mecbench.profiles import resolve_profile
from mecbench.v1 import common_pb2, controller_pb2, sut_agent_pb2
from store.layout import check_segment, experiment_manifest_key, run_prefix
from store.spool import PendingObject

log = get_logger("mecbench.controller.experiments")

_SCENARIO_SLUGS: dict[int, str] = {
    common_pb2.SCENARIO_SINGLE_STREAM: "ss",
    common_pb2.SCENARIO_MULTI_STREAM: "ms",
    common_pb2.SCENARIO_SERVER: "server",
    common_pb2.SCENARIO_OFFLINE: "offline",
}


# --- validation and expansion ----------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    scenario: int
    clients: int
    profile: common_pb2.NetworkProfile
    qps: float
    # The SUT's placement at this point (over the spec's sut.resources); None = the spec's own.
    resources: common_pb2.ResourceLimits | None = None
    # GPUs the SUT gets at this point (replacing the spec's sut.gpus); None = the spec's own.
    gpu_count: int | None = None

    @property
    def selector(self) -> str:
        parts = [_SCENARIO_SLUGS.get(self.scenario, "unspecified"), f"c{self.clients}", self.profile.name or "unshaped"]
        if self.scenario == common_pb2.SCENARIO_SERVER:
            parts.append(f"q{self.qps:g}")
        if self.resources is not None:
            parts.append(placement_slug(self.resources))
        if self.gpu_count is not None:
            parts.append(f"gpu{self.gpu_count}")
        return "-".join(parts)


def placement_slug(resources: common_pb2.ResourceLimits) -> str:
    """A placement in a selector: cpu0.5, pin0_1, excl2, mem256m."""
    parts = []
    if resources.cpu_cores:
        parts.append(f"cpu{resources.cpu_cores:g}")
    if resources.cpus:
        parts.append("pin" + "_".join(str(c) for c in resources.cpus))
    if resources.exclusive_cpus:
        parts.append(f"excl{resources.exclusive_cpus}")
    if resources.memory_bytes:
        parts.append(f"mem{resources.memory_bytes // 2**20}m")
    return "-".join(parts) or "unconfined"


def _placements(spec: controller_pb2.ExperimentSpec, violations: Violations) -> list[common_pb2.ResourceLimits | None]:
    sweep = spec.sweep
    if sweep.placements and sweep.cpu_cores:
        violations.add("spec.sweep.cpu_cores", "sweep placements or cpu_cores (its shorthand), not both")
    for index, cores in enumerate(sweep.cpu_cores):
        violations.check(math.isfinite(cores) and cores > 0, f"spec.sweep.cpu_cores[{index}]", "must be positive")
    placements = list(sweep.placements) or [common_pb2.ResourceLimits(cpu_cores=c) for c in sweep.cpu_cores]
    for index, placement in enumerate(sweep.placements):
        violations.check(math.isfinite(placement.cpu_cores) and placement.cpu_cores >= 0,
                         f"spec.sweep.placements[{index}].cpu_cores", "must not be negative")
    slugs = [placement_slug(p) for p in placements]
    violations.check(len(set(slugs)) == len(slugs), "spec.sweep.placements", "placements must differ")
    return list(placements) or [None]


def sut_for(spec: controller_pb2.ExperimentSpec, point: Point) -> sut_agent_pb2.SutConfig:
    """The SUT config a point runs on: the spec's, with the point's placement over its resources."""
    config = sut_agent_pb2.SutConfig()
    config.CopyFrom(spec.sut)
    if point.gpu_count is not None:
        config.gpus.CopyFrom(common_pb2.GpuRequest(count=point.gpu_count))
    placement = point.resources
    if placement is None:
        return config
    if placement.cpu_cores:
        config.resources.cpu_cores = placement.cpu_cores
    if placement.memory_bytes:
        config.resources.memory_bytes = placement.memory_bytes
    if placement.cpus or placement.exclusive_cpus:
        del config.resources.cpus[:]
        config.resources.cpus.extend(placement.cpus)
        config.resources.exclusive_cpus = placement.exclusive_cpus
    return config


def _profiles(spec: controller_pb2.ExperimentSpec, violations: Violations) -> list[common_pb2.NetworkProfile]:
    resolved = []
    for index, profile in enumerate(spec.sweep.network_profiles or [common_pb2.NetworkProfile()]):
        try:
            resolved.append(resolve_profile(profile, f"spec.sweep.network_profiles[{index}]"))
        except InvalidArgument as exc:
            violations.extend(exc.violations)
    return resolved


def expand(spec: controller_pb2.ExperimentSpec) -> tuple[list[Point], Violations]:
    violations = Violations()
    scenarios = list(spec.sweep.scenarios) or [spec.settings.scenario]
    clients = list(spec.sweep.clients) or [1]
    qps_values = list(spec.sweep.server_target_qps) or [spec.settings.server_target_qps]
    for index, count in enumerate(clients):
        violations.check(1 <= count <= MAX_CLIENTS, f"spec.sweep.clients[{index}]", f"must be 1..{MAX_CLIENTS}")
    for index, qps in enumerate(spec.sweep.server_target_qps):
        violations.check(qps > 0, f"spec.sweep.server_target_qps[{index}]", "must be positive")
    for index, scenario in enumerate(spec.sweep.scenarios):
        violations.check(scenario in _SCENARIO_SLUGS, f"spec.sweep.scenarios[{index}]", "unknown scenario")
    profiles = _profiles(spec, violations)
    names = [p.name or "unshaped" for p in profiles]
    violations.check(len(set(names)) == len(names), "spec.sweep.network_profiles", "profile names must be unique")
    placements = _placements(spec, violations)
    gpu_counts: list[int | None] = list(spec.sweep.gpu_counts) or [None]
    violations.check(len(set(gpu_counts)) == len(gpu_counts), "spec.sweep.gpu_counts", "counts must differ")
    for index, wanted in enumerate(spec.sweep.gpu_counts):
        violations.check(wanted <= 64, f"spec.sweep.gpu_counts[{index}]", "at most 64")
    points = []
    for scenario, count, profile, placement, gpus in itertools.product(
        scenarios, clients, profiles, placements, gpu_counts
    ):
        for qps in qps_values if scenario == common_pb2.SCENARIO_SERVER else [0.0]:
            points.append(Point(scenario, count, profile, qps, placement, gpus))
    return points, violations


MLPERF_SCENARIO_NAMES: dict[int, str] = {
    common_pb2.SCENARIO_SINGLE_STREAM: "SingleStream",
    common_pb2.SCENARIO_MULTI_STREAM: "MultiStream",
    common_pb2.SCENARIO_SERVER: "Server",
    common_pb2.SCENARIO_OFFLINE: "Offline",
}


def _matches(pattern: str, value: str) -> bool:
    return not pattern or fnmatch.fnmatchcase(value, pattern)


def settings_for(spec: controller_pb2.ExperimentSpec, scenario: int) -> common_pb2.LoadGenSettings:
    """The base settings with every matching override merged over them, in order (later wins)."""
    settings = common_pb2.LoadGenSettings()
    settings.CopyFrom(spec.settings)
    scenario_name = MLPERF_SCENARIO_NAMES.get(scenario, "")
    for override in spec.overrides:
        if _matches(override.model, spec.model or "*") and _matches(override.scenario, scenario_name):
            settings.MergeFrom(override.settings)
    return settings


def goodput_fraction(repeat: controller_pb2.RepeatResult) -> float:
    """The share of a repeat's requests, over every client, that met the TTFT/TPOT SLOs; 0 when
    a request failed or the clients kept no LLM figures (the relay path)."""
    good = total = 0.0
    for client in repeat.clients:
        metrics = client.result.llm_metrics
        if metrics.get("requests_failed", 0.0) or client.result.failed_samples:
            return 0.0
        good += metrics.get("goodput_requests", 0.0)
        total += metrics.get("requests_ok", 0.0)
    return good / total if total else 0.0


def point_spec(spec: controller_pb2.ExperimentSpec, point: Point, sut_id: str,
               selector: str = "") -> controller_pb2.RunSpec:
    settings = settings_for(spec, point.scenario)
    settings.scenario = point.scenario  # type: ignore[assignment]
    if point.scenario == common_pb2.SCENARIO_SERVER and point.qps:
        # The sweep's QPS is the total offered load; each client carries its share.
        settings.server_target_qps = point.qps / point.clients
    run = controller_pb2.RunSpec(
        experiment_id=spec.experiment_id,
        selector=selector or point.selector,
        sut_id=sut_id,
        loadgen_mode=spec.loadgen.mode,
        dataset=spec.dataset,
        settings=settings,
        data_plane=spec.loadgen.data_plane,
        clients=point.clients,
        repeats=spec.sweep.repeats or 1,
        busy_policy=spec.busy_policy,
        labels=spec.labels,
    )
    if point.profile.name or point.profile.HasField("netem"):
        run.network.CopyFrom(point.profile)
    apply_mix(spec, point.profile.name, run)
    if spec.HasField("accuracy"):
        run.accuracy.CopyFrom(spec.accuracy)
    return run


def validate_experiment(spec: controller_pb2.ExperimentSpec) -> list[Point]:
    """Every violation of the whole spec at once; nothing starts unless all points are valid."""
    violations = Violations()
    if not spec.experiment_id:
        violations.add("spec.experiment_id", "must not be empty")
    else:
        try:
            check_segment(spec.experiment_id, "spec.experiment_id")
        except InvalidArgument as exc:
            violations.extend(exc.violations)
    if not spec.HasField("sut"):
        violations.add("spec.sut", "must be set")
    if spec.HasField("accuracy"):
        validate_accuracy(spec.accuracy, "spec.accuracy", violations)
    points, expansion = expand(spec)
    points = mix_points(spec, points, expansion)
    violations.extend(expansion.items)
    violations.check(spec.sweep.repeats <= 100, "spec.sweep.repeats", "at most 100")
    if spec.HasField("search"):
        search = spec.search
        violations.check(durations.to_ns(search.latency_bound) > 0, "spec.search.latency_bound", "must be positive")
        violations.check(0 < search.low_qps < search.high_qps, "spec.search.low_qps",
                         "need 0 < low_qps < high_qps")
        violations.check(0 <= search.percentile <= 100, "spec.search.percentile", "must be between 0 and 100")
        violations.check(0 <= search.tolerance < 1, "spec.search.tolerance", "must be in [0, 1)")
        violations.check(0 <= search.min_goodput_fraction <= 1, "spec.search.min_goodput_fraction",
                         "must be between 0 and 1")
    seen_fields = {v.field for v in violations.items}
    if spec.experiment_id and spec.HasField("sut") and not violations:
        for point in points:
            run_spec = point_spec(spec, point, sut_id="")
            run_spec.ClearField("sut_id")
            run_spec.ClearField("accuracy")  # checked once above, as spec.accuracy
            run_spec.sut.CopyFrom(sut_for(spec, point))
            for violation in validate_run_spec(run_spec, f"spec.points[{point.selector}]").items:
                if violation.field not in seen_fields:
                    violations.items.append(violation)
                    seen_fields.add(violation.field)
    if not points and not spec.HasField("search"):
        violations.add("spec.sweep", "has no points")
    for index, override in enumerate(spec.overrides):
        scenario = override.scenario
        violations.check(
            not scenario or any(ch in scenario for ch in "*?[") or scenario in MLPERF_SCENARIO_NAMES.values(),
            f"spec.overrides[{index}].scenario",
            f"{scenario!r} is no MLPerf scenario ({', '.join(MLPERF_SCENARIO_NAMES.values())}) or pattern",
        )
        violations.check(
            not override.settings.scenario,
            f"spec.overrides[{index}].settings.scenario",
            "an override cannot change the scenario; the sweep sets it",
        )
    violations.raise_if_any()
    return points


# --- execution -------------------------------------------------------------------------------

# Nothing to compute: whatever latency and ceiling remain are the harness's own.
CALIBRATION_SUT = sut_agent_pb2.SutConfig(
    synthetic=sut_agent_pb2.SyntheticBackendConfig(distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT)
)


def calibration_settings() -> list[tuple[str, common_pb2.LoadGenSettings]]:
    """Two short tests: SingleStream for the added latency, Offline for the throughput ceiling
    (LoadGen issues everything at once, so the harness alone sets the pace)."""
    return [
        (
            "calibration-singlestream",
            common_pb2.LoadGenSettings(
                scenario=common_pb2.SCENARIO_SINGLE_STREAM,
                min_duration=durations.from_seconds(1.0),
                min_query_count=200,
                single_stream_expected_latency=durations.from_seconds(0.0005),
                skip_mlperf_defaults=True,
            ),
        ),
        (
            "calibration-offline",
            common_pb2.LoadGenSettings(
                scenario=common_pb2.SCENARIO_OFFLINE,
                min_duration=durations.from_seconds(0.5),
                min_query_count=1,
                offline_expected_qps=10_000,
                skip_mlperf_defaults=True,
            ),
        ),
    ]



@dataclass
class ActiveExperiment:
    experiment: controller_pb2.Experiment
    points: list[Point]
    cancel: threading.Event = field(default_factory=threading.Event)
    current_run: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


class ExperimentManager:
    """Runs experiments one point at a time. Every change of an experiment is checkpointed: its
    row in the registry (so a restarted controller keeps the history) and its manifest in the
    results store, `{experiment}/manifest.json`, listing every run with where its files are."""

    def __init__(self, runs: RunManager, run_timeout_s: float = 24 * 3600.0) -> None:
        self.runs = runs
        self.registry = runs.registry
        self.run_timeout_s = run_timeout_s
        self._experiments: dict[str, ActiveExperiment] = {}
        self._lock = threading.Lock()
        self._reconcile()

    def _reconcile(self) -> None:
        """An experiment that was running when a previous controller stopped cannot go on where
        it was (its current run died with that controller): it is marked failed, and every point
        it finished stays listed with its results."""
        for experiment in self.registry.list_experiments(ACTIVE_STATES):
            experiment.state = common_pb2.RUN_STATE_FAILED
            experiment.error = "controller restarted while the experiment was running; finished points are kept"
            experiment.finished_at.CopyFrom(now())
            self._save(experiment)
            log.warning("experiment_marked_failed_on_restart", experiment_id=experiment.experiment_id)

    def _save(self, experiment: controller_pb2.Experiment) -> None:
        self.registry.save_experiment(experiment)
        runs = []
        for run_id in [*experiment.calibration.run_ids, *experiment.run_ids]:
            try:
                runs.append(self.runs.get_run(run_id))
            except NotFound:
                runs.append(controller_pb2.Run(run_id=run_id, error="no record of this run"))
        manifest = experiment_manifest(experiment, runs)
        # Through the spool like every result file: a store outage delays the manifest, never loses it.
        self.runs.spool.write(
            f"experiment:{experiment.experiment_id}",
            [PendingObject(self.runs.store.results_bucket, experiment_manifest_key(experiment.experiment_id),
                           manifest, "application/json")],
        )

    def _checkpoint(self, active: ActiveExperiment) -> None:
        with active.lock:
            copy = controller_pb2.Experiment()
            copy.CopyFrom(active.experiment)
        try:
            self._save(copy)
        except Exception:
            # The registry is local sqlite; a failure here is a bug or a full disk. The experiment
            # goes on (its runs keep their own records) and the next checkpoint tries again.
            log.exception("experiment_checkpoint_failed", experiment_id=copy.experiment_id)

    def start(self, spec: controller_pb2.ExperimentSpec) -> controller_pb2.Experiment:
        points = validate_experiment(spec)
        violations = Violations()
        self.runs.check_request_reach(spec.accuracy, spec.webhook_url, "spec", violations)
        violations.raise_if_any()
        if any(is_shaped(point.profile) for point in points):
            self.runs.check_can_shape()
        # Placements this node cannot give are refused now, before the first point runs.
        configs = {sut_for(spec, p).SerializeToString(deterministic=True): sut_for(spec, p) for p in points}
        for config in configs.values():
            self.runs.pool.check_placement(config, f"experiment-{spec.experiment_id}")
        with self._lock:
            existing = self._experiments.get(spec.experiment_id)
            if existing is not None and existing.experiment.state not in TERMINAL_STATES:
                raise FailedPrecondition(f"experiment {spec.experiment_id!r} is already running")
            experiment = controller_pb2.Experiment(
                experiment_id=spec.experiment_id, spec=spec, state=common_pb2.RUN_STATE_PENDING,
                created_at=now(), points_total=len(points),
            )
            active = ActiveExperiment(experiment, points)
            self._experiments[spec.experiment_id] = active
        self._checkpoint(active)
        threading.Thread(target=self._execute, args=(active,), name=f"exp-{spec.experiment_id}", daemon=True).start()
        return self.get(spec.experiment_id)

    def get(self, experiment_id: str) -> controller_pb2.Experiment:
        with self._lock:
            active = self._experiments.get(experiment_id)
        if active is None:
            return self.registry.get_experiment(experiment_id)
        with active.lock:
            copy = controller_pb2.Experiment()
            copy.CopyFrom(active.experiment)
            return copy

    def list(self) -> list[controller_pb2.Experiment]:
        """Every experiment this controller or an earlier one ran; live ones as they are now."""
        with self._lock:
            live = set(self._experiments)
        stored = {e.experiment_id: e for e in self.registry.list_experiments()}
        for experiment_id in live:
            stored[experiment_id] = self.get(experiment_id)
        return sorted(stored.values(), key=lambda e: (e.created_at.ToNanoseconds(), e.experiment_id))

    def cancel(self, experiment_id: str) -> controller_pb2.Experiment:
        with self._lock:
            active = self._experiments.get(experiment_id)
        if active is None:
            return self.registry.get_experiment(experiment_id)  # finished before: nothing to cancel
        active.cancel.set()
        if active.current_run:
            self.runs.cancel_run(active.current_run)
        return self.get(experiment_id)

    def wait(self, experiment_id: str, timeout: float) -> controller_pb2.Experiment:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            experiment = self.get(experiment_id)
            if experiment.state in TERMINAL_STATES:
                return experiment
            time.sleep(0.1)
        raise TimeoutError(f"experiment {experiment_id} did not finish in {timeout}s")

    def _set(self, active: ActiveExperiment, **fields: Any) -> None:
        with active.lock:
            for name, value in fields.items():
                setattr(active.experiment, name, value)
        self._checkpoint(active)

    def _run_to_end(
        self, active: ActiveExperiment, run_spec: controller_pb2.RunSpec, record: Callable[[str], None], what: str
    ) -> controller_pb2.Run:
        """Start a run, `record` its id, and wait for it: Cancelled when it (or the experiment)
        was cancelled, FailedPrecondition naming `what` when it did not succeed."""
        if active.cancel.is_set():
            raise Cancelled("experiment cancelled")
        run = self.runs.start_run(run_spec)
        active.current_run = run.run_id
        record(run.run_id)
        final = self.runs.wait(run.run_id, self.run_timeout_s)
        active.current_run = ""
        if final.state == common_pb2.RUN_STATE_CANCELLED:
            raise Cancelled("experiment cancelled")
        if final.state != common_pb2.RUN_STATE_SUCCEEDED:
            raise FailedPrecondition(f"{what} failed: {final.error}")
        return final

    def _run_point(self, active: ActiveExperiment, run_spec: controller_pb2.RunSpec) -> controller_pb2.Run:
        def record(run_id: str) -> None:
            with active.lock:
                active.experiment.run_ids.append(run_id)
            self._checkpoint(active)

        return self._run_to_end(active, run_spec, record, f"point {run_spec.selector}")

    def _execute(self, active: ActiveExperiment) -> None:
        spec = active.experiment.spec
        sut_id = f"exp-{spec.experiment_id}"
        self._set(active, state=common_pb2.RUN_STATE_RUNNING)
        try:
            if not spec.skip_calibration:
                self._calibrate(active)
            self.runs.pool.deploy_sut(sut_id, sut_for(spec, active.points[0]) if active.points else spec.sut)
            for point in active.points:
                # A point with its own placement takes a SUT agent placed so (the same one when unchanged).
                self.runs.pool.deploy_sut(sut_id, sut_for(spec, point))
                self._run_point(active, point_spec(spec, point, sut_id))
                with active.lock:
                    active.experiment.points_done += 1
                self._checkpoint(active)
            if spec.HasField("search"):
                for profile, clients in _search_cells(spec):
                    peak = self._search(active, spec, sut_id, profile, clients)
                    with active.lock:
                        active.experiment.peaks.append(peak)
                    self._checkpoint(active)
            self._set(active, state=common_pb2.RUN_STATE_SUCCEEDED)
        except Cancelled:
            self._set(active, state=common_pb2.RUN_STATE_CANCELLED, error="cancelled")
        except MecbenchError as exc:
            self._set(active, state=common_pb2.RUN_STATE_FAILED, error=str(exc))
        except Exception as exc:
            log.exception("experiment_failed", experiment_id=spec.experiment_id)
            self._set(active, state=common_pb2.RUN_STATE_FAILED, error=f"{type(exc).__name__}: {exc}")
        finally:
            with active.lock:
                active.experiment.finished_at.CopyFrom(now())
            self._checkpoint(active)
            try:
                self.runs.pool.remove_sut(sut_id)
            except MecbenchError:
                log.warning("sut_removal_failed", sut_id=sut_id)
            if spec.webhook_url:
                self._call_webhook(active)

    def _call_webhook(self, active: ActiveExperiment) -> None:
        """Tell the experiment's webhook how it ended, and record what happened to the call."""
        experiment = self.get(active.experiment.experiment_id)
        document: dict[str, object] = {
            "experiment_id": experiment.experiment_id,
            "state": common_pb2.RunState.Name(experiment.state),
            "run_ids": list(experiment.run_ids),
            "error": experiment.error,
        }
        delivery = webhooks.deliver(experiment.spec.webhook_url, document, self.runs.settings.webhook_hosts)
        with active.lock:
            active.experiment.webhook.CopyFrom(delivery)
        self._checkpoint(active)

    def _calibrate(self, active: ActiveExperiment) -> None:
        """Measure the harness's floor (see HarnessCalibration) before the first point. A failed
        calibration is recorded and the experiment goes on; a cancel stops it here."""
        spec = active.experiment.spec
        sut_id = f"exp-{spec.experiment_id}-calibration"
        calibration = controller_pb2.HarnessCalibration()
        try:
            self.runs.pool.deploy_sut(sut_id, CALIBRATION_SUT)
            for selector, settings in calibration_settings():
                run_spec = controller_pb2.RunSpec(
                    experiment_id=spec.experiment_id,
                    selector=selector,
                    sut_id=sut_id,
                    loadgen_mode=spec.loadgen.mode,
                    dataset=spec.dataset,
                    settings=settings,
                    # The calibration SUT is synthetic: its sessions relay, whatever the points' do.
                    data_plane=relayed(spec.loadgen.data_plane),
                    clients=1,
                    repeats=1,
                    labels={**spec.labels, "mecbench.calibration": "true"},
                )
                what = f"calibration run {selector}"
                final = self._run_to_end(active, run_spec, calibration.run_ids.append, what)
                if not final.results:
                    raise FailedPrecondition(f"{what} failed: it stored no result")
                result = final.results[0].aggregate
                if settings.scenario == common_pb2.SCENARIO_SINGLE_STREAM:
                    calibration.single_stream_latency.CopyFrom(result.latency)
                else:
                    calibration.offline_samples_per_second = result.samples_per_second
        except MecbenchError as exc:
            if isinstance(exc, Cancelled):
                raise
            calibration.error = str(exc)
            log.warning("calibration_failed", experiment_id=spec.experiment_id, error=str(exc))
        finally:
            with active.lock:
                active.experiment.calibration.CopyFrom(calibration)
            self._checkpoint(active)
            try:
                self.runs.pool.remove_sut(sut_id)
            except MecbenchError:
                log.warning("sut_removal_failed", sut_id=sut_id)

    def _search(self, active: ActiveExperiment, spec: controller_pb2.ExperimentSpec, sut_id: str,
                profile: common_pb2.NetworkProfile, clients: int) -> controller_pb2.PeakResult:
        """Bisection over Server runs: `low` met the bound, `high` did not (or is untested)."""
        search = spec.search
        percentile = search.percentile or 99.0
        tolerance = search.tolerance or 0.05
        low, high = search.low_qps, search.high_qps
        peak = controller_pb2.PeakResult(network_profile=profile.name or "unshaped", clients=clients)
        base = controller_pb2.ExperimentSpec()
        base.CopyFrom(spec)
        base.settings.server_target_latency.CopyFrom(search.latency_bound)
        base.settings.server_target_latency_percentile = percentile
        steps = 0

        def probe(qps: float) -> bool:
            point = Point(common_pb2.SCENARIO_SERVER, clients, profile, qps)
            run = self._run_point(active, point_spec(base, point, sut_id, f"peak-{point.selector}"))
            peak.run_ids.append(run.run_id)
            result = run.results[-1].aggregate
            # LoadGen's own judgement of the latency bound at the percentile; validity as a whole
            # also asks for minimum durations and query counts that a search probe need not meet.
            met = result.performance_constraints_met
            if met and search.min_goodput_fraction > 0:
                met = goodput_fraction(run.results[-1]) >= search.min_goodput_fraction
            if met and qps >= peak.peak_qps:
                peak.peak_qps = qps
                peak.latency_at_peak.CopyFrom(result.latency.p99)
            return met

        # The search's anchor is confirmed before it is given up: on a busy machine one stall can
        # push a short probe's tail past the bound, and a failed `low` ends the search at 0.
        if not probe(low) and not probe(low):
            return peak
        if probe(high):
            return peak
        while high / low - 1 > tolerance and steps < (search.max_steps or 12):
            middle = (low + high) / 2
            if probe(middle):
                low = middle
            else:
                high = middle
            steps += 1
        return peak

    def iter_results(self, experiment_id: str) -> Iterator[controller_pb2.ResultRecord]:
        yield from self.runs.registry.list_results(controller_pb2.ListResultsRequest(experiment_id=experiment_id))


def experiment_manifest(experiment: controller_pb2.Experiment, runs: list[controller_pb2.Run]) -> bytes:
    """The experiment's index in the store: what it is, how it went, and every run with where
    its files are, so the bucket alone is enough to find and compare its results."""
    def stamp(value: Timestamp) -> str | None:
        return value.ToJsonString() if value.ToNanoseconds() else None

    calibration_runs = set(experiment.calibration.run_ids)

    document = {
        "experiment_id": experiment.experiment_id,
        "state": common_pb2.RunState.Name(experiment.state),
        "error": experiment.error,
        "created_at": stamp(experiment.created_at),
        "finished_at": stamp(experiment.finished_at),
        "points_total": experiment.points_total,
        "points_done": experiment.points_done,
        "runs": [
            {
                "run_id": run.run_id,
                "selector": run.spec.selector,
                "state": common_pb2.RunState.Name(run.state),
                "error": run.error,
                "created_at": stamp(run.created_at),
                "finished_at": stamp(run.finished_at),
                "results_spooled": run.results_spooled,
                "prefix": run_prefix(run.spec.experiment_id, run.spec.selector, run.run_id)
                if run.spec.experiment_id else None,
                "repeats": [{"repeat": r.repeat, "result_uri": r.result_uri} for r in run.results],
            }
            for run in runs
            if run.run_id not in calibration_runs
        ],
        "calibration": {
            **json_format.MessageToDict(experiment.calibration, preserving_proto_field_name=True),
            "runs": [
                {"run_id": run.run_id, "selector": run.spec.selector, "result_uri": r.result_uri}
                for run in runs
                if run.run_id in calibration_runs
                for r in run.results
            ],
        }
        if experiment.HasField("calibration")
        else None,
        "peaks": [json_format.MessageToDict(p, preserving_proto_field_name=True) for p in experiment.peaks],
        "spec": json_format.MessageToDict(experiment.spec, preserving_proto_field_name=True),
    }
    return json.dumps(document, indent=2).encode()


def _search_cells(spec: controller_pb2.ExperimentSpec) -> list[tuple[common_pb2.NetworkProfile, int]]:
    profiles = [resolve_profile(p) for p in spec.sweep.network_profiles] or [common_pb2.NetworkProfile()]
    return [(p, c) for p in profiles for c in (list(spec.sweep.clients) or [1])]


