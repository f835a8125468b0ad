"""Experiments: one spec in, a complete, comparable set of measurements out.

An experiment is validated as a whole (every violation, with its field path, at once), expanded
into points (scenario x clients x network profile x target QPS), and each point runs as a run
(with the spec's repeats) through the RunManager, one after another so points never share the
SUT. A peak search adds, per network profile and client count, a bisection over Server runs
for the highest QPS LoadGen still judges VALID at the latency bound.
"""

from __future__ import annotations

import itertools
import json
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from controller.runs import TERMINAL_STATES, RunManager, now
from controller.validation import MAX_CLIENTS, validate_run_spec
from mecbench.core import durations
from mecbench.core.errors import Cancelled, FailedPrecondition, InvalidArgument, MecbenchError, NotFound, Violations
from mecbench.core.logging import get_logger
from mecbench.profiles import STRING_FIELDS, netem_from_strings, resolve_profile
from mecbench.v1 import common_pb2, controller_pb2
from store.layout import check_segment

log = get_logger("mecbench.controller.experiments")

_SCENARIO_SLUGS: dict[int, str] = {
    common_pb2.SCENARIO_SINGLE_STREAM: "ss",
    common_pb2.SCENARIO_MULTI_STREAM: "ms",
    common_pb2.SCENARIO_SERVER: "server",
    common_pb2.SCENARIO_OFFLINE: "offline",
}


# --- the spec file ---------------------------------------------------------------------------


def _normalise(document: dict[str, Any]) -> dict[str, Any]:
    """Accept the shorthands people write: profile names as strings, and the original MECBench
    string NetEm config (`bandwidth: 100mbit`, `delay: 20ms`) inside a profile."""
    sweep = document.get("sweep") or {}
    profiles = sweep.get("network_profiles") or sweep.get("networkProfiles") or []
    normalised = []
    for index, entry in enumerate(profiles):
        profile = {"name": entry} if isinstance(entry, str) else dict(entry)
        netem = profile.get("netem")
        if isinstance(netem, dict) and set(netem) & set(STRING_FIELDS):
            typed = netem_from_strings({k: str(v) for k, v in netem.items()},
                                       f"spec.sweep.network_profiles[{index}].netem")
            profile["netem"] = json_format.MessageToDict(typed, preserving_proto_field_name=True)
        normalised.append(profile)
    if profiles:
        sweep = {k: v for k, v in sweep.items() if k not in ("network_profiles", "networkProfiles")}
        sweep["network_profiles"] = normalised
        document = {**document, "sweep": sweep}
    return document


def parse_experiment(text: str, source: str = "experiment") -> controller_pb2.ExperimentSpec:
    """An ExperimentSpec from YAML or JSON text (JSON is YAML)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{source}: not valid YAML/JSON: {exc}", field="spec") from None
    if not isinstance(document, dict):
        raise InvalidArgument(f"{source}: expected a mapping at the top level", field="spec")
    spec = controller_pb2.ExperimentSpec()
    try:
        json_format.ParseDict(_normalise(document), spec)
    except json_format.ParseError as exc:
        raise InvalidArgument(f"{source}: {exc}", field="spec") from None
    return spec


def load_experiment_file(path: Path) -> controller_pb2.ExperimentSpec:
    return parse_experiment(path.read_text(), str(path))


# --- validation and expansion ----------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    scenario: int
    clients: int
    profile: common_pb2.NetworkProfile
    qps: float

    @property
    def selector(self) -> str:
        parts = [_SCENARIO_SLUGS[self.scenario], f"c{self.clients}", self.profile.name or "unshaped"]
        if self.scenario == common_pb2.SCENARIO_SERVER:
            parts.append(f"q{self.qps:g}")
        return "-".join(parts)


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
    points = []
    for scenario, count, profile in itertools.product(scenarios, clients, profiles):
        for qps in qps_values if scenario == common_pb2.SCENARIO_SERVER else [0.0]:
            points.append(Point(scenario, count, profile, qps))
    return points, violations


def point_spec(spec: controller_pb2.ExperimentSpec, point: Point, sut_id: str,
               selector: str = "") -> controller_pb2.RunSpec:
    settings = common_pb2.LoadGenSettings()
    settings.CopyFrom(spec.settings)
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
    points, expansion = expand(spec)
    violations.extend(expansion.items)
    violations.check(spec.sweep.repeats <= 100, "spec.sweep.repeats", "at most 100")
    if spec.HasField("search"):
        search = spec.search
        violations.check(durations.to_ns(search.latency_bound) > 0, "spec.search.latency_bound", "must be positive")
        violations.check(0 < search.low_qps < search.high_qps, "spec.search.low_qps",
                         "need 0 < low_qps < high_qps")
        violations.check(0 <= search.percentile <= 100, "spec.search.percentile", "must be between 0 and 100")
        violations.check(0 <= search.tolerance < 1, "spec.search.tolerance", "must be in [0, 1)")
    seen_fields = {v.field for v in violations.items}
    if spec.experiment_id and spec.HasField("sut") and not violations:
        for point in points:
            run_spec = point_spec(spec, point, sut_id="")
            run_spec.ClearField("sut_id")
            run_spec.sut.CopyFrom(spec.sut)
            for violation in validate_run_spec(run_spec, f"spec.points[{point.selector}]").items:
                if violation.field not in seen_fields:
                    violations.items.append(violation)
                    seen_fields.add(violation.field)
    if not points and not spec.HasField("search"):
        violations.add("spec.sweep", "has no points")
    violations.raise_if_any()
    return points


# --- execution -------------------------------------------------------------------------------


@dataclass
class ActiveExperiment:
    experiment: controller_pb2.Experiment
    points: list[Point]
    cancel: threading.Event = field(default_factory=threading.Event)
    current_run: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


class ExperimentManager:
    def __init__(self, runs: RunManager, run_timeout_s: float = 24 * 3600.0) -> None:
        self.runs = runs
        self.run_timeout_s = run_timeout_s
        self._experiments: dict[str, ActiveExperiment] = {}
        self._lock = threading.Lock()

    def start(self, spec: controller_pb2.ExperimentSpec) -> controller_pb2.Experiment:
        points = validate_experiment(spec)
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
        threading.Thread(target=self._execute, args=(active,), name=f"exp-{spec.experiment_id}", daemon=True).start()
        return self.get(spec.experiment_id)

    def get(self, experiment_id: str) -> controller_pb2.Experiment:
        with self._lock:
            active = self._experiments.get(experiment_id)
        if active is None:
            raise NotFound(f"experiment {experiment_id!r} not found")
        with active.lock:
            copy = controller_pb2.Experiment()
            copy.CopyFrom(active.experiment)
            return copy

    def list(self) -> list[controller_pb2.Experiment]:
        with self._lock:
            ids = list(self._experiments)
        return [self.get(i) for i in ids]

    def cancel(self, experiment_id: str) -> controller_pb2.Experiment:
        with self._lock:
            active = self._experiments.get(experiment_id)
        if active is None:
            raise NotFound(f"experiment {experiment_id!r} not found")
        active.cancel.set()
        if active.current_run:
            self.runs.cancel_run(active.current_run)
        return self.get(experiment_id)

    def wait(self, experiment_id: str, timeout: float) -> controller_pb2.Experiment:
        import time

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

    def _run_point(self, active: ActiveExperiment, run_spec: controller_pb2.RunSpec) -> controller_pb2.Run:
        if active.cancel.is_set():
            raise Cancelled("experiment cancelled")
        run = self.runs.start_run(run_spec)
        active.current_run = run.run_id
        with active.lock:
            active.experiment.run_ids.append(run.run_id)
        final = self.runs.wait(run.run_id, self.run_timeout_s)
        active.current_run = ""
        if final.state == common_pb2.RUN_STATE_CANCELLED:
            raise Cancelled("experiment cancelled")
        if final.state != common_pb2.RUN_STATE_SUCCEEDED:
            raise FailedPrecondition(f"point {run_spec.selector} failed: {final.error}")
        return final

    def _execute(self, active: ActiveExperiment) -> None:
        spec = active.experiment.spec
        sut_id = f"exp-{spec.experiment_id}"
        self._set(active, state=common_pb2.RUN_STATE_RUNNING)
        try:
            self.runs.pool.deploy_sut(sut_id, spec.sut)
            for point in active.points:
                self._run_point(active, point_spec(spec, point, sut_id))
                with active.lock:
                    active.experiment.points_done += 1
            if spec.HasField("search"):
                for profile, clients in _search_cells(spec):
                    peak = self._search(active, spec, sut_id, profile, clients)
                    with active.lock:
                        active.experiment.peaks.append(peak)
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
            try:
                self.runs.pool.remove_sut(sut_id)
            except MecbenchError:
                log.warning("sut_removal_failed", sut_id=sut_id)
            if spec.webhook_url:
                _call_webhook(spec.webhook_url, self.get(spec.experiment_id))

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
            if met and qps >= peak.peak_qps:
                peak.peak_qps = qps
                peak.latency_at_peak.CopyFrom(result.latency.p99)
            return met

        if not probe(low):
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


def _search_cells(spec: controller_pb2.ExperimentSpec) -> list[tuple[common_pb2.NetworkProfile, int]]:
    profiles = [resolve_profile(p) for p in spec.sweep.network_profiles] or [common_pb2.NetworkProfile()]
    return [(p, c) for p in profiles for c in (list(spec.sweep.clients) or [1])]


def _call_webhook(url: str, experiment: controller_pb2.Experiment) -> None:
    body = json.dumps({
        "experiment_id": experiment.experiment_id,
        "state": common_pb2.RunState.Name(experiment.state),
        "run_ids": list(experiment.run_ids),
        "error": experiment.error,
    }).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except OSError as exc:
        log.warning("webhook_failed", url=url, error=str(exc))
