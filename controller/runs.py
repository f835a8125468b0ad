"""Runs: start, execute, watch, cancel. Plain Python over the agent pool, the registry and the
store; the servicer only translates messages.

A run is one LoadGen test (or a series of repeats) of one point: SUT ready, LoadGen sessions
open (reused across runs), every client's test started together behind a barrier, LoadGen's
files and the parsed results written to the store, the registry updated at each state change.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

import mecbench
from controller import webhooks
from controller.accuracy import ACCURACY_MODES, LABELS_ROOTS_SETTING, apply_accuracy, read_labels, score_clients
from controller.agents import AgentPool, LoadGenHandle, SutHandle
from controller.aggregate import (
    TokenRows,
    aggregate_results,
    mark_failures,
    read_sample_latencies,
    read_token_latencies,
)
from controller.backends.base import AgentHandle
from controller.clusters import ClusterLogs, ClusterWatch, cluster_record
from controller.groups import any_shaped, client_profiles, group_results, network_label, resolve_groups
from controller.registry import ACTIVE_STATES, RunRegistry
from controller.settings import ControllerSettings
from controller.shaping import RunShaping, check_cluster_side, is_shaped
from controller.telemetry import TelemetryRecorder, telemetry_csv, telemetry_json
from controller.validation import validate_run_spec
from mecbench.breakdown import latency_breakdown
from mecbench.core import durations
from mecbench.core.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    MecbenchError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Violations,
)
from mecbench.core.latencies import Latencies
from mecbench.core.logging import get_logger
from mecbench.profiles import resolve_profile
from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2, node_agent_pb2, sut_agent_pb2
from store.base import ObjectStore, StoreUnavailable
from store.layout import (
    ACCURACY_LOG_NAME,
    ACCURACY_SCORE_NAME,
    SAMPLE_LATENCIES_NAME,
    TOKEN_LATENCIES_NAME,
    content_type_for,
    repeat_prefix,
)
from store.local_files import resolve_allowed
from store.spool import PendingObject, UploadSpool
from store.uris import is_s3, object_uri_problem

log = get_logger("mecbench.controller.runs")

TERMINAL_STATES = (
    common_pb2.RUN_STATE_SUCCEEDED,
    common_pb2.RUN_STATE_FAILED,
    common_pb2.RUN_STATE_CANCELLED,
)
SCENARIO_SELECTORS = {
    common_pb2.SCENARIO_SINGLE_STREAM: "singlestream",
    common_pb2.SCENARIO_MULTI_STREAM: "multistream",
    common_pb2.SCENARIO_SERVER: "server",
    common_pb2.SCENARIO_OFFLINE: "offline",
}


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


# How long a cancel keeps stopping tests that were starting when it arrived.
CANCEL_REPEAT_S = 30.0


@dataclass
class ActiveRun:
    """A run this controller process is executing, with its watchers' event log."""

    run: controller_pb2.Run
    cancel: threading.Event = field(default_factory=threading.Event)
    events: list[controller_pb2.WatchRunResponse] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    # (loadgen, session id) of tests in flight, for CancelRun.
    sessions: list[tuple[LoadGenHandle, str]] = field(default_factory=list)
    # Why the run was stopped from the inside (its shaping was lost): it ends FAILED with this.
    failure: str = ""
    # The run's shaping while it is held: its counters and probes go with each repeat.
    shaping: RunShaping | None = None
    # Each client's latest (live QPS, samples completed) in the repeat running now.
    client_progress: dict[int, tuple[float, int]] = field(default_factory=dict)


@dataclass
class ClientOutcome:
    client: int
    result: common_pb2.TestResult | None = None
    files: dict[str, bytearray] = field(default_factory=dict)
    setup_time_s: float = 0.0
    cancelled: bool = False
    error: MecbenchError | None = None
    live_qps: float = 0.0
    samples_completed: int = 0
    sample_errors: int = 0
    first_sample_error: str = ""


class RunManager:
    def __init__(
        self,
        registry: RunRegistry,
        pool: AgentPool,
        store: ObjectStore,
        settings: ControllerSettings,
        spool: UploadSpool,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.store = store
        self.spool = spool
        self.settings = settings
        self._active: dict[str, ActiveRun] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(settings.max_concurrent_runs, thread_name_prefix="run")
        # Set once the results bucket was seen to exist: from then on a store outage spools.
        self._results_bucket_seen = False
        self._reconcile()

    def _reconcile(self) -> None:
        """Runs that were in flight when a previous controller stopped cannot be resumed honestly:
        their LoadGen tests died with it. Mark them failed, keeping every repeat already stored."""
        for run in self.registry.runs_in_states(ACTIVE_STATES):
            run.state = common_pb2.RUN_STATE_FAILED
            run.error = "controller restarted while the run was in flight; finished repeats are kept"
            run.finished_at.CopyFrom(now())
            self.registry.save_run(run)
            log.warning("run_marked_failed_on_restart", run_id=run.run_id)
        # Results a previous controller spooled but did not upload: the flusher finishes them.
        for owner in self.spool.pending_owners():
            try:
                run = self.registry.get_run(owner)
            except NotFound:
                continue
            if not run.results_spooled:
                run.results_spooled = True
                self.registry.save_run(run)

    def results_uploaded(self, run_id: str) -> None:
        """The spool has delivered every file of `run_id` to the store."""
        with self._lock:
            active = self._active.get(run_id)
        if active is not None:
            with active.changed:
                active.run.results_spooled = False
            self._publish(active, "spooled results are now in the store")
            return
        try:
            run = self.registry.get_run(run_id)
        except NotFound:
            return
        run.results_spooled = False
        self.registry.save_run(run)
        log.info("spooled_results_uploaded", run_id=run_id)

    # --- API ---------------------------------------------------------------------------------

    def check_request_reach(
        self, accuracy: common_pb2.AccuracySpec, webhook_url: str, prefix: str, violations: Violations
    ) -> None:
        """What a request may reach, checked against the operator's settings before anything
        starts: a local labels path must lie under its roots, a webhook go to a host it allows."""
        labels = accuracy.labels_uri
        if labels and not is_s3(labels) and object_uri_problem(labels, "") is None:
            try:
                resolve_allowed(labels, self.settings.labels_roots, field=f"{prefix}.accuracy.labels_uri",
                                setting=LABELS_ROOTS_SETTING)
            except InvalidArgument as exc:
                violations.extend(exc.violations)
        if webhook_url:
            problem = webhooks.url_problem(webhook_url) or webhooks.host_problem(
                webhook_url, self.settings.webhook_hosts
            )
            if problem is not None:
                violations.add(f"{prefix}.webhook_url", problem)

    def start_run(self, spec: controller_pb2.RunSpec) -> controller_pb2.Run:
        violations = validate_run_spec(spec)
        limit_s = self.settings.max_test_duration_s
        for name in ("min_duration", "max_duration"):
            value = getattr(spec.settings, name)
            violations.check(
                durations.to_seconds(value) <= limit_s, f"spec.settings.{name}",
                f"longer than this controller allows for one test ({limit_s:g}s, max_test_duration_s)",
            )
        self.check_request_reach(spec.accuracy, spec.webhook_url, "spec", violations)
        violations.raise_if_any()
        with self._lock:
            waiting = sum(1 for a in self._active.values() if a.run.state == common_pb2.RUN_STATE_PENDING)
        if waiting >= self.settings.max_pending_runs:
            raise ResourceExhausted(
                f"{waiting} runs are already waiting to start (max_pending_runs); try again when some have run"
            )
        spec = self._with_defaults(_copy(spec))
        if spec.HasField("network"):
            spec.network.CopyFrom(resolve_profile(spec.network, "spec.network"))
        if spec.HasField("cluster_network"):
            spec.cluster_network.CopyFrom(resolve_profile(spec.cluster_network, "spec.cluster_network"))
            if is_shaped(spec.cluster_network):
                self.pool.backend.cluster_shaping_points(0)  # refused now where there are no such links
                check_cluster_side(self.pool.backend, spec.cluster_network)
        resolve_groups(spec)
        if any_shaped(spec):
            self.check_can_shape()
        if spec.sut_id and spec.busy_policy == controller_pb2.BUSY_POLICY_REJECT:
            sut = self.pool.get_sut(spec.sut_id)
            if sut.held_by:
                raise FailedPrecondition(f"SUT {spec.sut_id!r} is in use by run {sut.held_by}")
        elif spec.sut_id:
            self.pool.get_sut(spec.sut_id)
        if spec.HasField("sut") and not spec.sut_id:
            # Resources and GPUs this node cannot give are refused now: no run, nothing started.
            self.pool.check_placement(spec.sut, "run-check")
        run = controller_pb2.Run(
            run_id=f"run-{uuid.uuid4().hex[:12]}",
            spec=spec,
            state=common_pb2.RUN_STATE_PENDING,
            created_at=now(),
            progress=controller_pb2.RunProgress(repeats=spec.repeats),
        )
        active = ActiveRun(run=run)
        self.registry.save_run(run)
        with self._lock:
            self._active[run.run_id] = active
        self._publish(active, "run created")
        self._executor.submit(self._execute, active)
        log.info("run_started", run_id=run.run_id, experiment_id=spec.experiment_id, selector=spec.selector)
        return _copy(run)

    def check_can_shape(self) -> None:
        """Refuse a shaped run before it starts, not at its first point, where the deployment
        has no path to shape (FAILED_PRECONDITION saying what to use instead)."""
        self.pool.backend.shaping_points("sut", 0)

    @staticmethod
    def _with_defaults(spec: controller_pb2.RunSpec) -> controller_pb2.RunSpec:
        spec.clients = spec.clients or sum(g.clients for g in spec.client_groups) or 1
        spec.repeats = spec.repeats or 1
        spec.selector = spec.selector or SCENARIO_SELECTORS[spec.settings.scenario]
        spec.loadgen_mode = spec.loadgen_mode or controller_pb2.LOAD_GEN_MODE_SERVER
        spec.busy_policy = spec.busy_policy or controller_pb2.BUSY_POLICY_QUEUE
        spec.settings.mode = spec.settings.mode or common_pb2.TEST_MODE_PERFORMANCE_ONLY
        return spec

    def get_run(self, run_id: str) -> controller_pb2.Run:
        with self._lock:
            active = self._active.get(run_id)
        if active is not None:
            with active.changed:
                return _copy(active.run)
        return self.registry.get_run(run_id)

    def list_runs(self, request: controller_pb2.ListRunsRequest) -> controller_pb2.ListRunsResponse:
        page_size = min(request.page_size or 50, 500)
        offset = int(request.page_token) if request.page_token.isdigit() else 0
        runs = self.registry.list_runs(request.experiment_id, request.state, page_size + 1, offset)
        response = controller_pb2.ListRunsResponse(runs=runs[:page_size])
        if len(runs) > page_size:
            response.next_page_token = str(offset + page_size)
        return response

    def watch_run(self, run_id: str, is_active: Callable[[], bool]) -> Iterator[controller_pb2.WatchRunResponse]:
        """The current state first, then every event until the run ends or the watcher leaves."""
        with self._lock:
            active = self._active.get(run_id)
        if active is None:
            run = self.registry.get_run(run_id)
            yield controller_pb2.WatchRunResponse(
                time=now(), state=run.state, progress=run.progress, message="current state", run=run
            )
            return
        with active.changed:
            snapshot = _copy(active.run)
            position = len(active.events)
        yield controller_pb2.WatchRunResponse(
            time=now(), state=snapshot.state, progress=snapshot.progress, message="current state", run=snapshot
        )
        if snapshot.state in TERMINAL_STATES:
            return
        while is_active():
            with active.changed:
                if len(active.events) == position:
                    active.changed.wait(timeout=0.5)
                pending = active.events[position:]
                position += len(pending)
            for event in pending:
                yield event
                if event.state in TERMINAL_STATES:
                    return

    def cancel_run(self, run_id: str) -> controller_pb2.Run:
        with self._lock:
            active = self._active.get(run_id)
        if active is None:
            run = self.registry.get_run(run_id)
            if run.state not in TERMINAL_STATES:
                raise FailedPrecondition(f"run {run_id} is not executing in this controller")
            return run
        self._stop_tests(active)
        self._publish(active, "cancel requested")
        return self.get_run(run_id)

    def _stop_tests(self, active: ActiveRun) -> None:
        """Stop the run's LoadGen tests. A test may be about to start when the cancel arrives
        (sessions open, RunTest not yet at the agent, where a CancelTest finds nothing to cancel),
        so the cancel is repeated until the run has no tests left in flight."""
        active.cancel.set()

        def cancel_until_idle() -> None:
            deadline = time.monotonic() + CANCEL_REPEAT_S
            while time.monotonic() < deadline:
                with active.changed:
                    sessions = list(active.sessions)
                if not sessions:
                    return
                for loadgen, session_id in sessions:
                    try:
                        loadgen.client.cancel_test(session_id)
                    except MecbenchError as exc:
                        log.warning("cancel_test_failed", run_id=active.run.run_id, session_id=session_id,
                                    error=str(exc))
                time.sleep(0.2)

        threading.Thread(target=cancel_until_idle, name=f"cancel-{active.run.run_id}", daemon=True).start()

    def _abort(self, active: ActiveRun, reason: str) -> None:
        """End a run from the inside: its tests stop, and it fails with `reason`."""
        if active.failure:
            return
        active.failure = reason
        log.error("run_aborted", run_id=active.run.run_id, reason=reason)
        self._stop_tests(active)

    def wait(self, run_id: str, timeout: float) -> controller_pb2.Run:
        """Block until the run ends (for tests and the CLI's in-process use)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get_run(run_id)
            if run.state in TERMINAL_STATES:
                return run
            time.sleep(0.05)
        raise TimeoutError(f"run {run_id} still {common_pb2.RunState.Name(run.state)} after {timeout}s")

    def close(self) -> None:
        with self._lock:
            actives = list(self._active.values())
        for active in actives:
            if active.run.state not in TERMINAL_STATES:
                self.cancel_run(active.run.run_id)
        self._executor.shutdown(wait=True, cancel_futures=False)

    # --- execution ---------------------------------------------------------------------------

    def _publish(
        self,
        active: ActiveRun,
        message: str,
        state: int | None = None,
        persist: bool = True,
    ) -> None:
        with active.changed:
            run = active.run
            if state is not None and state != run.state:
                run.state = state  # type: ignore[assignment]
                if state == common_pb2.RUN_STATE_RUNNING and not run.HasField("started_at"):
                    run.started_at.CopyFrom(now())
                if state in TERMINAL_STATES:
                    run.finished_at.CopyFrom(now())
            event = controller_pb2.WatchRunResponse(
                time=now(), state=run.state, progress=run.progress, message=message, run=run
            )
            active.events.append(event)
            active.changed.notify_all()
            if persist:
                self.registry.save_run(run)

    def _execute(self, active: ActiveRun) -> None:
        run = active.run
        spec = run.spec
        sut: SutHandle | None = None
        held = False
        try:
            self._check_store()
            self._publish(active, "deploying", common_pb2.RUN_STATE_DEPLOYING)
            if spec.sut_id:
                sut = self.pool.get_sut(spec.sut_id)
            else:
                sut = self.pool.deploy_sut(f"run-{run.run_id}", spec.sut, ephemeral=True)
            wait = spec.busy_policy != controller_pb2.BUSY_POLICY_REJECT
            if sut.held_by and wait:
                self._publish(active, f"queued: SUT {sut.sut_id} is in use by run {sut.held_by}", persist=False)
            held = self.pool.hold_sut(sut, run.run_id, wait, active.cancel)
            if not held:
                raise Cancelled("cancelled while waiting for the SUT")
            if spec.sut_id and spec.HasField("sut") and spec.sut != sut.config:
                self.pool.deploy_sut(spec.sut_id, spec.sut)
            job_mode = spec.loadgen_mode == controller_pb2.LOAD_GEN_MODE_JOB
            cluster_shaped = spec.HasField("cluster_network") and is_shaped(spec.cluster_network)
            if cluster_shaped and not sut.is_cluster:
                raise FailedPrecondition(f"spec.cluster_network: SUT {sut.sut_id} is no cluster (SutConfig.cluster)")
            with contextlib.ExitStack() as held_resources:
                if any_shaped(spec) or cluster_shaped:
                    self._publish(active, f"applying network profile {network_label(spec) or 'custom'}",
                                  persist=False)
                    active.shaping = held_resources.enter_context(
                        RunShaping(self.pool, run.run_id, None, spec.clients, self.settings.shaping_lease_s,
                                   on_lost=lambda reason: self._abort(active, reason), sut=sut.agent,
                                   client_profiles=client_profiles(spec),
                                   cluster_profile=spec.cluster_network if cluster_shaped else None,
                                   cluster_members=[m.name for m in sut.workers])
                    )
                for repeat in range(1, spec.repeats + 1):
                    if active.cancel.is_set():
                        raise Cancelled("cancelled")
                    self._run_repeat(active, sut, repeat, job_mode)
            self._publish(active, "succeeded", common_pb2.RUN_STATE_SUCCEEDED)
        except Exception as exc:
            if active.failure:
                with active.changed:
                    run.error = active.failure
                self._publish(active, f"failed: {active.failure}", common_pb2.RUN_STATE_FAILED)
            elif isinstance(exc, Cancelled):
                with active.changed:
                    run.error = str(exc)
                self._publish(active, "cancelled", common_pb2.RUN_STATE_CANCELLED)
            elif active.cancel.is_set():
                self._publish(active, "cancelled", common_pb2.RUN_STATE_CANCELLED)
            else:
                reason = str(exc) if isinstance(exc, MecbenchError) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, MecbenchError):
                    log.exception("run_failed_unexpectedly", run_id=run.run_id)
                with active.changed:
                    run.error = reason
                self._publish(active, f"failed: {reason}", common_pb2.RUN_STATE_FAILED)
        finally:
            if sut is not None:
                if held:
                    self.pool.release_sut(sut, run.run_id)
                if sut.ephemeral:
                    self.pool.remove_sut(sut.sut_id)
            if spec.webhook_url:
                self._call_webhook(active)
            with self._lock:
                self._active.pop(run.run_id, None)
            log.info("run_ended", run_id=run.run_id, state=common_pb2.RunState.Name(run.state))

    def _call_webhook(self, active: ActiveRun) -> None:
        """Tell the run's webhook how it ended, and record what happened to the call."""
        run = active.run
        document: dict[str, object] = {
            "run_id": run.run_id,
            "experiment_id": run.spec.experiment_id,
            "state": common_pb2.RunState.Name(run.state),
            "error": run.error,
            "results": [json_format.MessageToDict(result) for result in run.results],
        }
        delivery = webhooks.deliver(run.spec.webhook_url, document, self.settings.webhook_hosts)
        with active.changed:
            run.webhook.CopyFrom(delivery)
        self._publish(active, f"webhook: {delivery.error or delivery.status_code}")

    def _check_store(self) -> None:
        """Refuse to measure what could not be kept: the results bucket must be known to exist
        and the spool must have room. The store itself is needed to keep results, not to
        measure them: once its bucket has been seen, a store that is away now only means the
        results wait in the spool (a blip must not stop a sweep)."""
        try:
            self.store.list(self.store.results_bucket, "__probe__/")
            self._results_bucket_seen = True
        except NotFound as exc:
            raise FailedPrecondition(f"results store not ready ({exc}); call InitStorage first") from None
        except StoreUnavailable as exc:
            if not self._results_bucket_seen:
                raise
            log.warning("store_unreachable_at_run_start", error=str(exc))
        free = shutil.disk_usage(self.spool.directory).free
        if free < self.settings.spool_min_free_bytes:
            raise FailedPrecondition(
                f"the results spool {self.spool.directory} has {free} bytes free, less than "
                f"spool_min_free_bytes ({self.settings.spool_min_free_bytes}): results could not be kept"
            )

    def _run_repeat(self, active: ActiveRun, sut: SutHandle, repeat: int, job_mode: bool) -> None:
        """One repeat. In job mode every client gets a fresh LoadGen process that loads the
        dataset itself and goes away after the test (isolation); otherwise the persistent
        sessions of the LoadGen servers are reused (speed). Both record their set-up time."""
        if not job_mode:
            loadgens = [self.pool.loadgen_for_client(c, active.run.spec.loadgen_id)
                        for c in range(active.run.spec.clients)]
            self._run_repeat_on(active, sut, repeat, loadgens, time.monotonic())
            return
        setup_started = time.monotonic()
        job_ids = [f"job-{active.run.run_id.removeprefix('run-')}-r{repeat}-c{c}"
                   for c in range(active.run.spec.clients)]
        try:
            loadgens = [self.pool.deploy_loadgen(job_id, self.pool.backend.loadgen_placement(c))
                        for c, job_id in enumerate(job_ids)]
            self._run_repeat_on(active, sut, repeat, loadgens, setup_started)
        finally:
            for job_id in job_ids:
                self.pool.forget_loadgen(job_id)

    def _run_repeat_on(self, active: ActiveRun, sut: SutHandle, repeat: int, loadgens: list[LoadGenHandle],
                       setup_started: float) -> None:
        run = active.run
        spec = run.spec
        clients = spec.clients
        with active.changed:
            run.progress.repeat = repeat
            active.client_progress.clear()
        self.pool.check_alive(sut)
        serving = self.pool.sut_serving(sut)
        server_log_offset = serving.server_log_size
        if repeat == 1 and serving.server_pid:
            # The run's first repeat keeps the server's start-up output too (model loading),
            # as much of its end as the log limit allows.
            tail_start = serving.server_log_size - self.settings.max_log_bytes // 2
            server_log_offset = max(serving.server_log_start, tail_start)
        log_marks = _log_marks(
            [("sut-agent", sut.agent), *((f"sut-agent-{m.name}", m.agent) for m in sut.workers),
             *((f"loadgen-c{i}", lg.agent) for i, lg in enumerate(loadgens))]
        )
        member_logs = ClusterLogs(self.pool, sut, repeat == 1, self.settings.max_log_bytes)
        sessions: list[str] = []
        for client, loadgen in enumerate(loadgens):
            try:
                session_id, _opened = self.pool.session_for(
                    loadgen, sut, spec.dataset, spec.data_plane, client, owner=run.run_id
                )
            except MecbenchError:
                self.pool.check_alive(loadgen)
                raise
            sessions.append(session_id)
        session_setup_s = time.monotonic() - setup_started
        self.pool.sut_stats(sut, reset=True)
        if sut.placement_lost:
            raise FailedPrecondition(sut.placement_lost)
        placement_before = self.pool.read_placement(sut)
        self._publish(active, f"repeat {repeat} of {spec.repeats}: running", common_pb2.RUN_STATE_RUNNING)

        outcomes = [ClientOutcome(client) for client in range(clients)]
        barrier = threading.Barrier(clients)
        with active.changed:
            active.sessions = list(zip(loadgens, sessions, strict=True))
        recorder = TelemetryRecorder(self.pool, self.settings.telemetry_interval_s, self._telemetry_targets(spec))
        threads = [
            threading.Thread(
                target=self._run_client,
                args=(active, loadgens[i], sessions[i], repeat, outcomes[i], barrier),
                name=f"client-{run.run_id}-{i}",
                daemon=True,
            )
            for i in range(clients)
        ]
        if active.shaping is not None:
            active.shaping.start_repeat()
        # A cluster member that dies during the test ends the run, naming it.
        watch = ClusterWatch(self.pool, sut, lambda why: self._abort(active, f"{why} (during repeat {repeat})"))
        with recorder if self.settings.telemetry_interval_s > 0 else contextlib.nullcontext(), watch:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        network = active.shaping.end_repeat() if active.shaping is not None else None
        with active.changed:
            active.sessions = []
        telemetry = recorder.snapshot()
        if telemetry:
            self.registry.save_telemetry(run.run_id, telemetry)
        placement = sut_placement(sut.config, placement_before, self.pool.read_placement(sut))
        oom = oom_failure(placement, repeat)
        errors = [o.error for o in outcomes if o.error is not None]
        if errors:
            for outcome, loadgen, session_id in zip(outcomes, loadgens, sessions, strict=True):
                if outcome.error is not None:
                    self.pool.drop_session(loadgen, session_id)
            if oom:  # the kernel killed the SUT at its memory limit: that, not what the clients saw
                raise FailedPrecondition(f"{oom} ({errors[0]})")
            # An agent that died is the cause, whatever the clients saw of it: say which.
            handles: list[SutHandle | LoadGenHandle] = [sut, *loadgens]
            for handle in handles:
                try:
                    self.pool.check_alive(handle)
                except Unavailable as dead:
                    raise Unavailable(f"{dead}: it stopped during repeat {repeat} ({errors[0]})") from None
            raise errors[0]
        if any(o.cancelled for o in outcomes) or active.cancel.is_set():
            raise Cancelled(f"cancelled during repeat {repeat}; repeats finished before it are kept")
        sut_stats = self.pool.sut_stats(sut, reset=False)
        # A server that died or hung during the test: what was measured is kept, marked invalid,
        # and the run fails saying why.
        sut_failure = self.pool.sut_failure(sut) or self.pool.cluster_failure(sut)
        server_log = self.pool.sut_server_log(sut, server_log_offset, self.settings.max_log_bytes)
        extra_files = member_logs.files(self.settings.max_log_bytes)
        self._publish(active, f"repeat {repeat}: uploading", common_pb2.RUN_STATE_UPLOADING)
        self._store_repeat(
            active, sut, repeat, outcomes, sut_stats, session_setup_s, telemetry, log_marks, server_log, sut_failure,
            network, placement=placement, extra_files=extra_files,
        )
        if oom:
            raise FailedPrecondition(oom)
        if sut_failure:
            raise FailedPrecondition(f"the SUT failed during repeat {repeat}: {sut_failure}")
        if sut.placement_lost:
            raise FailedPrecondition(sut.placement_lost)

    def _run_client(
        self,
        active: ActiveRun,
        loadgen: LoadGenHandle,
        session_id: str,
        repeat: int,
        outcome: ClientOutcome,
        barrier: threading.Barrier,
    ) -> None:
        run = active.run
        request = loadgen_agent_pb2.RunTestRequest(
            session_id=session_id,
            settings=run.spec.settings,
            test_id=f"{run.run_id}-r{repeat}-c{outcome.client}",
            # Several clients' percentiles are merged from every sample's latency.
            # One measuring mode for every client count and the calibration: each sample's own
            # latency is kept for one client as for many (the client's sample clock, or LoadGen's
            # trace where the clock cannot see the schedule: Offline).
            record_sample_latencies=True,
        )
        try:
            barrier.wait(timeout=60)
            if active.cancel.is_set():
                outcome.cancelled = True  # cancelled while the sessions were being set up
                return
            # Every client's test starts together so their measurement windows overlap.
            stream = loadgen.client.run_test(request, self.settings.max_test_duration_s,
                                             where=f"client {outcome.client}")
            for event in stream:
                outcome.error = self._take_event(active, outcome, event)
                if outcome.error is not None:
                    stream.cancel()  # the test is abandoned: its agent stops it
                    break
            else:
                if outcome.result is None and not outcome.cancelled:
                    outcome.error = FailedPrecondition(
                        f"LoadGen agent {loadgen.loadgen_id}: test ended without a result"
                    )
        except threading.BrokenBarrierError:
            outcome.error = FailedPrecondition("another client failed before the test started")
        except MecbenchError as exc:  # the agent's stream broke (it failed, or died)
            if active.cancel.is_set():
                outcome.cancelled = True
            else:
                outcome.error = exc
        if outcome.error is not None:
            barrier.abort()

    def _take_event(
        self, active: ActiveRun, outcome: ClientOutcome, event: loadgen_agent_pb2.RunTestResponse
    ) -> MecbenchError | None:
        """Record one event of a client's test; the error that ends the test, if it brings one."""
        kind = event.WhichOneof("event")
        if kind == "log_chunk":
            chunk = event.log_chunk
            buffer = outcome.files.setdefault(chunk.name, bytearray())
            if len(buffer) + len(chunk.data) > self.settings.max_log_bytes:
                return FailedPrecondition(f"log file {chunk.name} exceeds {self.settings.max_log_bytes} bytes")
            buffer += chunk.data
        elif kind == "started":
            outcome.setup_time_s = durations.to_seconds(event.started.setup_time)
            if active.shaping is not None:
                active.shaping.test_started()  # time-varying links start with the test
        elif kind == "progress":
            outcome.live_qps = event.progress.live_qps
            outcome.samples_completed = event.progress.samples_completed
            self._progress(active, outcome.client, event.progress)
        elif kind == "finished":
            outcome.result = event.finished.result
            outcome.cancelled = event.finished.cancelled
            outcome.sample_errors = event.finished.sample_errors
            outcome.first_sample_error = event.finished.first_sample_error
        return None

    def _score_accuracy(
        self, spec: common_pb2.AccuracySpec, measured: list[ClientOutcome], aggregate: common_pb2.TestResult
    ) -> dict[str, object]:
        """Score each client's accuracy log into its result and the aggregate. A scoring failure
        is reported in the result (and the run's files), never a reason to lose the logs."""
        results = [o.result for o in measured if o.result is not None]
        try:
            logs = []
            for outcome in measured:
                log_file = outcome.files.get(ACCURACY_LOG_NAME)
                if log_file is None:
                    raise FailedPrecondition(f"client {outcome.client} produced no {ACCURACY_LOG_NAME}")
                logs.append(bytes(log_file))
            scores = score_clients(spec, logs, read_labels(spec, self.store, self.settings.labels_roots))
        except (MecbenchError, ValueError) as exc:
            reason = f"accuracy not scored: {exc}"
            aggregate.valid = False
            aggregate.invalid_reasons.append(reason)
            log.warning("accuracy_not_scored", error=str(exc))
            return {"scorer": spec.scorer, "labels_uri": spec.labels_uri, "error": str(exc)}
        apply_accuracy(aggregate, results, scores, spec.scorer)
        return {
            "scorer": spec.scorer,
            "labels_uri": spec.labels_uri,
            "options": dict(spec.options),
            "metrics": dict(aggregate.accuracy),
            "clients": [{"client": o.client, "metrics": m} for o, m in zip(measured, scores, strict=True)],
        }

    def _telemetry_targets(self, spec: controller_pb2.RunSpec) -> list[node_agent_pb2.ShapingTarget]:
        """The data-path interfaces of the run, where the topology has them; else the node's own."""
        try:
            points = [p for c in range(spec.clients) for p in self.pool.backend.shaping_points("both", c)]
        except MecbenchError:
            return []
        return [p.target() for p in points]

    def telemetry(self, run_id: str, since: float) -> list[common_pb2.TelemetrySample]:
        return self.registry.telemetry(run_id=run_id, since=since)

    def _progress(self, active: ActiveRun, client: int, progress: loadgen_agent_pb2.TestProgress) -> None:
        """The run's live figures: the clients' sum (each reports its own test)."""
        with active.changed:
            active.client_progress[client] = (progress.live_qps, progress.samples_completed)
            active.run.progress.elapsed.CopyFrom(progress.elapsed)
            active.run.progress.live_qps = sum(qps for qps, _ in active.client_progress.values())
            active.run.progress.samples_completed = sum(done for _, done in active.client_progress.values())
        self._publish(active, "progress", persist=False)

    def _store_repeat(
        self,
        active: ActiveRun,
        sut: SutHandle,
        repeat: int,
        outcomes: list[ClientOutcome],
        sut_stats: sut_agent_pb2.SutStats,
        session_setup_s: float,
        telemetry: list[common_pb2.TelemetrySample],
        log_marks: list[LogMark],
        server_log: bytes = b"",
        sut_failure: str = "",
        network: dict[str, object] | None = None,
        placement: controller_pb2.SutPlacement | None = None,
        extra_files: dict[str, bytes] | None = None,
    ) -> None:
        run = active.run
        spec = run.spec
        prefix = repeat_prefix(spec.experiment_id, spec.selector, run.run_id, repeat)
        bucket = self.store.results_bucket
        files: dict[str, tuple[bytes, str]] = {}
        for mark in log_marks:
            # What each agent logged while this repeat ran, kept beside LoadGen's own logs.
            files[f"logs/{mark.label}.log"] = (mark.read_since(), "text/plain; charset=utf-8")
        if server_log:
            # What the external inference server printed while this repeat ran.
            files["logs/server.log"] = (server_log, "text/plain; charset=utf-8")
        for member_file, text in (extra_files or {}).items():
            files[member_file] = (text, "text/plain; charset=utf-8")  # a cluster's members' runtime logs
        if telemetry:
            files["telemetry.json"] = (telemetry_json(telemetry), "application/json")
            files["telemetry.csv"] = (telemetry_csv(telemetry), "text/csv; charset=utf-8")
        for outcome in outcomes:
            client_prefix = f"client-{outcome.client}/" if len(outcomes) > 1 else ""
            for name, data in sorted(outcome.files.items()):
                files[f"{client_prefix}{name}"] = (bytes(data), content_type_for(name))
        measured = [o for o in outcomes if o.result is not None]
        for outcome in measured:
            assert outcome.result is not None
            mark_failures(outcome.result, outcome.sample_errors, outcome.first_sample_error, sut_failure)
        aggregate = aggregate_results(
            [o.result for o in measured if o.result is not None], [_sample_latencies(o) for o in measured],
            [_token_rows(o) for o in measured],
        )
        if spec.HasField("accuracy") and spec.settings.mode in ACCURACY_MODES and measured:
            score = self._score_accuracy(spec.accuracy, measured, aggregate)
            files[ACCURACY_SCORE_NAME] = (json.dumps(score, indent=2).encode(), "application/json")
        if network is not None and network.get("problems"):
            # Measured on a link other than the one the result names: say so, with the figures.
            aggregate.valid = False
            aggregate.invalid_reasons.extend(f"link not as requested: {p}" for p in network["problems"])  # type: ignore[attr-defined]
        setup = durations.from_seconds(session_setup_s + max((o.setup_time_s for o in outcomes), default=0.0))
        repeat_result = controller_pb2.RepeatResult(
            repeat=repeat,
            clients=[controller_pb2.ClientResult(client=o.client, result=o.result) for o in outcomes if o.result],
            aggregate=aggregate,
            result_uri=self.store.uri(bucket, prefix),
            loadgen_setup_time=setup,
            sut_stats=sut_stats,
            placement=placement,
            groups=group_results(spec, [(o.client, o.result, _sample_latencies(o)) for o in measured if o.result]),
            cluster=cluster_record(self.pool, sut),
        )
        document = {
            "run_id": run.run_id,
            "experiment_id": spec.experiment_id,
            "selector": spec.selector,
            "repeat": repeat,
            "result": json_format.MessageToDict(repeat_result),
            "spec": json_format.MessageToDict(spec),
            "sut": {"sut_id": sut.sut_id, "config": json_format.MessageToDict(sut.config), "node": sut.agent.node},
            "software": software_versions(),
            "node": {"name": platform.node(), "platform": platform.platform(), "python": platform.python_version()},
            "created_at": now().ToJsonString(),
        }
        if network is not None:
            document["network"] = network
        breakdown = latency_breakdown(repeat_result)
        if breakdown is not None:
            document["latency_breakdown"] = breakdown  # where the time went (mecbench/breakdown.py)
        if placement is not None:
            # What the SUT was asked to get beside what the kernel says it got, and its own usage.
            document["placement"] = json_format.MessageToDict(placement)
        if repeat_result.HasField("cluster"):
            # The members of a cluster SUT: each one's node, address, runtime status and placement.
            document["cluster"] = json_format.MessageToDict(repeat_result.cluster)
        files["result.json"] = (json.dumps(document, indent=2).encode(), "application/json")
        # Spooled to local disk first, then uploaded: a store outage or a crash loses nothing.
        spooled = self.spool.write(
            run.run_id, [PendingObject(bucket, prefix + name, data, kind) for name, (data, kind) in files.items()]
        )
        names = list(files)
        record = controller_pb2.ResultRecord(
            experiment_id=spec.experiment_id,
            selector=spec.selector,
            run_id=run.run_id,
            repeat=repeat,
            result_uri=repeat_result.result_uri,
            result=aggregate,
            sut_backend=sut.config.WhichOneof("backend") or "",
            network_profile=network_label(spec),
            scenario=spec.settings.scenario,
            clients=spec.clients,
            created_at=now(),
            files=sorted(names),
            loadgen_setup_time=setup,
            groups=repeat_result.groups,
        )
        self.registry.save_result(record)
        with active.changed:
            run.results.append(repeat_result)
            if spooled:
                run.results_spooled = True
        if spooled:
            self._publish(
                active,
                f"repeat {repeat}: the store is unreachable ({self.spool.last_error}); {spooled} files kept in the "
                "local spool and uploaded when it returns",
            )
        else:
            self._publish(active, f"repeat {repeat} stored at {repeat_result.result_uri}")


@dataclass(frozen=True)
class LogMark:
    """Where an agent's log file stood when a repeat began."""

    label: str
    path: Path
    offset: int

    def read_since(self, limit: int = 16 * 1024 * 1024) -> bytes:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                return handle.read(limit)
        except OSError:
            return b""


def _log_marks(agents: list[tuple[str, AgentHandle]]) -> list[LogMark]:
    marks = []
    for label, agent in agents:
        if agent.log_path is not None:
            try:
                marks.append(LogMark(label, agent.log_path, agent.log_path.stat().st_size))
            except OSError:
                continue
    return marks


_COUNTERS = ("cpu_usage_ns", "cpu_periods", "cpu_throttled_periods", "cpu_throttled_ns", "oom_kills")


def sut_placement(
    config: sut_agent_pb2.SutConfig,
    before: node_agent_pb2.Placement | None,
    after: node_agent_pb2.Placement | None,
) -> controller_pb2.SutPlacement | None:
    """The repeat's placement record: the request, what the kernel held at the end of the test,
    and the group's counters over the test (memory peak since the SUT was placed)."""
    if after is None:
        return None
    usage = common_pb2.PlacementUsage()
    usage.CopyFrom(after.usage)
    if before is not None:
        for name in _COUNTERS:
            setattr(usage, name, max(0, getattr(after.usage, name) - getattr(before.usage, name)))
    return controller_pb2.SutPlacement(
        requested=config.resources, requested_gpus=config.gpus, applied=after.applied, usage=usage
    )


def oom_failure(placement: controller_pb2.SutPlacement | None, repeat: int) -> str:
    """Why the run fails when the kernel OOM-killed in the SUT's group during the repeat; ""."""
    if placement is None or not placement.usage.oom_kills:
        return ""
    limit = placement.applied.memory_limit_bytes
    return (
        f"the SUT was OOM-killed during repeat {repeat}: the kernel killed {placement.usage.oom_kills} process(es) "
        f"of its group at its memory limit of {limit} bytes ({limit / 2**20:.0f} MiB, resources.memory_bytes)"
    )


def software_versions() -> dict[str, str]:
    versions = {"mecbench": mecbench.__version__, "python": platform.python_version()}
    for dist in ("mlcommons-loadgen", "grpcio", "protobuf", "onnxruntime"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


MessageT = TypeVar("MessageT", bound=Message)
A = TypeVar("A")


def _copy(message: MessageT) -> MessageT:
    """A detached copy: callers and watchers never see a message that is still being changed."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _client_array(outcome: ClientOutcome, name: str, read: Callable[[bytes], A]) -> A | None:
    """A client's per-sample array file (`name`), or None when it has none or it does not parse
    (the aggregate then carries no figure rather than a wrong one)."""
    data = outcome.files.get(name)
    if data is None:
        return None
    try:
        return read(bytes(data))
    except ValueError as exc:
        log.warning("per_sample_file_unreadable", client=outcome.client, file=name, error=str(exc))
        return None


def _token_rows(outcome: ClientOutcome) -> TokenRows | None:
    return _client_array(outcome, TOKEN_LATENCIES_NAME, read_token_latencies)


def _sample_latencies(outcome: ClientOutcome) -> Latencies | None:
    return _client_array(outcome, SAMPLE_LATENCIES_NAME, read_sample_latencies)
