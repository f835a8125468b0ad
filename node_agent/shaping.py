"""Shaping: apply, clear, list and reconcile, with ownership and safety checks.

Order of an ApplyShaping: check the request (all violations at once), resolve the namespace and
the interface (NOT_FOUND), check the allowlist (PERMISSION_DENIED), check the kernel has every
piece the plan needs (FAILED_PRECONDITION with the probe's reason), inspect the roots (a foreign
root or ingress qdisc: FAILED_PRECONDITION; our own: ALREADY_EXISTS unless `replace`). Only then
is anything changed: the record is written first, the qdiscs installed, the kernel's readback
compared with the plan, and any failure rolls back what was installed.

`replace` removes whole MECBench shapings that occupy a slot the request needs (an egress and an
ingress are separate slots of an interface); it never removes anything MECBench did not install.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from pyroute2.netlink.exceptions import NetlinkError

from mecbench.core import durations
from mecbench.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Violations,
)
from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2, node_agent_pb2
from node_agent import linkprobe, loss, schedule, tc
from node_agent.netns import (
    Namespace,
    NamespaceGone,
    host_namespace,
    namespace_from_record,
    resolve_named,
    resolve_path,
)
from node_agent.pods import PodNetnsResolver
from node_agent.probe import KernelSupport
from node_agent.settings import NodeAgentSettings
from node_agent.state import LeaseRecord, ShapingRecord, StateStore, new_id
from node_agent.validation import ShapingSpec, TargetSpec, check_apply, check_lease, check_target

log = get_logger("mecbench.node_agent.shaping")

IFB_PREFIX = "mbifb"
INGRESS_KINDS = ("ingress", "ifb", "u32", "mirred")


def ifb_name_for(ifindex: int) -> str:
    return f"{IFB_PREFIX}{ifindex}"


def timestamp(unix: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(unix * 1e9))
    return ts


def lease_message(lease: LeaseRecord) -> node_agent_pb2.Lease:
    return node_agent_pb2.Lease(lease_id=lease.lease_id, owner=lease.owner, expires_at=timestamp(lease.expires_at))


def _kernel_error(action: str, exc: NetlinkError) -> FailedPrecondition:
    return FailedPrecondition(f"the kernel refused to {action}: {os.strerror(exc.code)} (errno {exc.code})")


def _link(ipr: Any, ifindex: int) -> Any | None:
    try:
        links = ipr.link("get", index=ifindex)
    except NetlinkError:
        return None
    return links[0] if links else None


def loss_readback(percent: float) -> dict[str, str]:
    return {"loss_percent": f"{percent:g}", "loss_mechanism": "bpf", "filter": "bpf prio 0x6d65 on the egress hook"}


def _link_kind(link: Any) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return str(info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""


class ShapingManager:
    def __init__(
        self,
        store: StateStore,
        settings: NodeAgentSettings,
        support: KernelSupport,
        pods: PodNetnsResolver,
    ) -> None:
        self.store = store
        self.settings = settings
        self.support = support
        self.pods = pods
        self._lock = threading.RLock()
        self._schedules: dict[str, schedule.ScheduleRun] = {}

    # --- resolving targets --------------------------------------------------------------------

    def check_namespace_allowed(self, target: TargetSpec) -> None:
        """Only MECBench's own namespaces: by name, by /run/netns path, or a pod of an allowed
        Kubernetes namespace. /proc paths resolve to whatever they are: the host's gets the host
        allowlist, any other is refused unless it carries an allowed name."""
        kind, ref = target.netns_kind, target.netns_ref
        if kind == "name" or (kind == "path" and os.path.dirname(ref) in ("/run/netns", "/var/run/netns")):
            name, patterns, variable = os.path.basename(ref), self.settings.netns_name_allowlist, "NETNS_NAME_ALLOWLIST"
        elif kind == "pod":
            name, patterns, variable = ref.partition("/")[0], self.settings.pod_namespace_allowlist, (
                "POD_NAMESPACE_ALLOWLIST"
            )
        else:
            return
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            raise PermissionDenied(
                f"{'pods of namespace' if kind == 'pod' else 'network namespace'} {name} is not MECBench's to shape "
                f"(allowed: {', '.join(patterns) or 'none'}; MECBENCH_NODE_AGENT_{variable})"
            )

    def resolve_namespace(self, target: TargetSpec) -> Namespace:
        self.check_namespace_allowed(target)
        if target.netns_kind == "name":
            return resolve_named(target.netns_ref)
        if target.netns_kind == "path":
            ns = resolve_path(target.netns_ref)
            if not ns.is_host and os.path.dirname(target.netns_ref) not in ("/run/netns", "/var/run/netns"):
                raise PermissionDenied(
                    f"{target.netns_ref} is not a named network namespace (/run/netns/NAME) nor the host's: "
                    "name it, or use a pod target"
                )
            return ns
        if target.netns_kind == "pod":
            namespace, _, name = target.netns_ref.partition("/")
            path = self.pods.resolve(namespace, name, target.pod_uid)
            return resolve_path(path, field="target.pod", kind="pod", ref=target.netns_ref)
        return host_namespace()

    def check_allowed(self, ns: Namespace, interface: str) -> None:
        """The allowlist: what may be shaped, so the node's uplink is not shaped by mistake."""
        if interface.startswith(IFB_PREFIX):
            raise PermissionDenied(f"{interface} is an ifb device MECBench manages; shape the interface it serves")
        denied = [p for p in self.settings.interface_denylist if fnmatch.fnmatchcase(interface, p)]
        if denied:
            raise PermissionDenied(f"interface {interface} matches the denylist ({', '.join(denied)})")
        if ns.is_host:
            patterns, scope, variable = (
                self.settings.host_interface_allowlist,
                "the node agent's own (host) network namespace",
                "MECBENCH_NODE_AGENT_HOST_INTERFACE_ALLOWLIST",
            )
        else:
            patterns, scope, variable = (
                self.settings.netns_interface_allowlist,
                f"network namespace {ns.label}",
                "MECBENCH_NODE_AGENT_NETNS_INTERFACE_ALLOWLIST",
            )
        if not any(fnmatch.fnmatchcase(interface, p) for p in patterns):
            raise PermissionDenied(
                f"interface {interface} in {scope} is not in the allowlist ({', '.join(patterns) or 'empty'}); "
                f"MECBench does not shape what may be the node's uplink. Extend {variable} to allow it."
            )

    # --- apply --------------------------------------------------------------------------------

    def apply(self, request: node_agent_pb2.ApplyShapingRequest) -> node_agent_pb2.Shaping:
        spec = check_apply(request, self.settings)
        steps: list[schedule.CheckedStep] = []
        if request.HasField("schedule"):
            violations = Violations()
            steps = schedule.check_schedule(request.schedule, "schedule", violations)
            violations.raise_if_any()
        ns = self.resolve_namespace(spec.target)
        with ns.netlink() as ipr:
            found = ipr.link_lookup(ifname=spec.target.interface)
            if not found:
                raise NotFound(f"interface {spec.target.describe()} does not exist")
            ifindex = int(found[0])
            link = _link(ipr, ifindex)
            mtu = int(link.get_attr("IFLA_MTU") or 1500) if link is not None else 1500
            self.check_allowed(ns, spec.target.interface)
            plan = self._plan(spec, mtu)
            self._step_plans(spec, steps, mtu, plan)
            needed = list(plan.kinds) + (list(INGRESS_KINDS) if spec.ingress else [])
            missing = self.support.missing(dict.fromkeys(needed))
            if missing:
                raise FailedPrecondition(
                    f"shaping {spec.target.describe()} needs {', '.join(dict.fromkeys(needed))}; this kernel lacks "
                    + "; ".join(missing)
                )
            with self._lock:
                replaced = self._inspect(ipr, ns, ifindex, spec)
                for record in replaced:
                    log.info("shaping_replaced", shaping_id=record.shaping_id, owner=record.owner)
                    self._remove(record)
                record = self._install(ipr, ns, ifindex, mtu, spec, plan, request)
            return self._message(record, ipr)

    def _plan(self, spec: ShapingSpec, mtu: int) -> tc.RootPlan:
        if spec.burst_bytes and spec.burst_bytes < mtu + tc.ETHERNET_HEADER:
            raise InvalidArgument(
                f"must be at least one full frame ({mtu + tc.ETHERNET_HEADER} bytes at MTU {mtu})",
                field="netem.burst_bytes",
            )
        burst = spec.burst_bytes or (tc.default_burst(spec.rate_bytes, mtu) if spec.rate_bytes else 0)
        netem = spec.netem
        if netem is not None and self._loss_by_bpf(netem):
            if spec.egress and spec.ingress:
                raise FailedPrecondition(
                    "loss without netem (a bpf drop on a clsact egress hook) is one direction at a time: the "
                    "interface's ingress slot cannot hold clsact and the ingress redirect together"
                )
            return tc.RootPlan(rate_bytes=spec.rate_bytes, burst_bytes=burst, bpf_loss_percent=netem.loss)
        if netem is not None:
            limit = tc.netem_limit(netem.limit, spec.rate_bytes, netem.delay_ns, netem.jitter_ns, mtu)
            netem = tc.NetemParams(**{**netem.__dict__, "limit": limit})
        return tc.RootPlan(rate_bytes=spec.rate_bytes, burst_bytes=burst, netem=netem)

    def _loss_by_bpf(self, netem: tc.NetemParams) -> bool:
        """Loss alone (no delay, jitter, correlation, ...) on a kernel without netem but with a
        bpf classifier: dropped by loss.py's program instead."""
        only_loss = netem.loss > 0 and netem == tc.NetemParams(loss=netem.loss, limit=netem.limit)
        return only_loss and not self.support.supports("netem") and self.support.supports("bpf")

    def _step_plans(
        self, spec: ShapingSpec, steps: list[schedule.CheckedStep], mtu: int, base: tc.RootPlan
    ) -> list[tuple[float, tc.RootPlan]]:
        """Each step's plan; every one must change in place what `base` installs."""
        plans = []
        violations = Violations()
        for index, step in enumerate(steps):
            step_spec = dataclasses.replace(
                spec, rate_bytes=step.rate_bytes, burst_bytes=step.burst_bytes, netem=step.netem
            )
            plan = self._plan(step_spec, mtu)
            if plan.kinds != base.kinds:
                violations.add(
                    f"schedule.steps[{index}].netem",
                    f"needs {'+'.join(plan.kinds)} where the shaping installs {'+'.join(base.kinds)}: a step can "
                    "change figures in place, not the kinds of qdisc (set the same kinds of figure in every step)",
                )
            plans.append((step.at_s, plan))
        violations.raise_if_any()
        return plans

    # --- schedules ----------------------------------------------------------------------------

    def start_schedule(self, shaping_id: str) -> schedule.ScheduleRun:
        """Apply the shaping's schedule from its first step, from now (restarting it if it runs)."""
        if not shaping_id:
            raise InvalidArgument("required", field="shaping_id")
        record = self.store.shaping(shaping_id)
        if record is None or record.state != "installed":
            raise NotFound(f"shaping {shaping_id} is unknown (lapsed or cleared?)")
        request = node_agent_pb2.ApplyShapingRequest.FromString(record.request)
        if not request.HasField("schedule"):
            raise FailedPrecondition(f"shaping {shaping_id} has no schedule")
        spec = check_apply(request, self.settings)
        violations = Violations()
        steps = schedule.check_schedule(request.schedule, "schedule", violations)
        violations.raise_if_any()
        ns = self._namespace_of(record)
        try:
            with ns.netlink() as ipr:
                link = _link(ipr, record.ifindex)
                mtu = int(link.get_attr("IFLA_MTU") or 1500) if link is not None else 1500
        except NamespaceGone as exc:
            raise NotFound(f"shaping {shaping_id}: {exc}") from None
        plans = self._step_plans(spec, steps, mtu, self._plan(spec, mtu))
        self.stop_schedule(shaping_id, missing_ok=True)

        def roots(ipr: Any) -> list[int]:
            found = [record.ifindex] if record.egress else []
            if record.ifb_name:
                found += [int(i) for i in ipr.link_lookup(ifname=record.ifb_name)]
            return found

        run = schedule.ScheduleRun(shaping_id, time.time())
        run.thread = threading.Thread(
            target=schedule.run_schedule,
            args=(run, plans, durations.to_seconds(request.schedule.period), ns.netlink, roots, mtu),
            name=f"schedule-{shaping_id}",
            daemon=True,
        )
        with self._lock:
            self._schedules[shaping_id] = run
        run.thread.start()
        log.info("schedule_started", shaping_id=shaping_id, steps=len(plans), source=request.schedule.source)
        return run

    def start_schedule_message(
        self, request: node_agent_pb2.StartScheduleRequest
    ) -> node_agent_pb2.StartScheduleResponse:
        run = self.start_schedule(request.shaping_id)
        return node_agent_pb2.StartScheduleResponse(started_at=timestamp(run.started_at))

    def stop_schedule_message(self, request: node_agent_pb2.StopScheduleRequest) -> node_agent_pb2.StopScheduleResponse:
        if not request.shaping_id:
            raise InvalidArgument("required", field="shaping_id")
        run = self.stop_schedule(request.shaping_id)
        return node_agent_pb2.StopScheduleResponse(started_at=timestamp(run.started_at), applied=run.timeline())

    def stop_schedule(self, shaping_id: str, missing_ok: bool = False) -> schedule.ScheduleRun:
        """Stop the schedule where it is (the link keeps its current step) and return its timeline."""
        with self._lock:
            run = self._schedules.pop(shaping_id, None)
        if run is None:
            if missing_ok:
                return schedule.ScheduleRun(shaping_id, 0.0)
            raise NotFound(f"shaping {shaping_id} has no schedule running")
        run.stop.set()
        if run.thread is not None:
            run.thread.join(timeout=10)
        log.info("schedule_stopped", shaping_id=shaping_id, applied=len(run.applied))
        return run

    def _occupying(self, ns: Namespace, ifindex: int, egress: bool, ingress: bool) -> list[ShapingRecord]:
        return [
            r
            for r in self.store.shapings()
            if r.netns_identity == ns.identity
            and r.ifindex == ifindex
            and ((egress and r.egress) or (ingress and r.ingress))
        ]

    def _inspect(self, ipr: Any, ns: Namespace, ifindex: int, spec: ShapingSpec) -> list[ShapingRecord]:
        """Check the slots the request needs; return our shapings to replace. Raises, touching
        nothing, on a foreign qdisc or on our own without `replace`."""
        where = spec.target.describe()
        ours = self._occupying(ns, ifindex, spec.egress, spec.ingress)
        if spec.egress and spec.netem is not None and self._loss_by_bpf(spec.netem):
            slot = tc.find_ingress(ipr, ifindex)
            if slot is not None and not (loss.installed_percent(ipr, ifindex) is not None and any(
                    r.egress for r in ours)):
                raise FailedPrecondition(
                    f"{where} has an {slot['kind']} qdisc in its ingress slot that MECBench did not install; loss "
                    "without netem needs a clsact there"
                )
        if spec.egress:
            root = tc.find_root(ipr, ifindex)
            if root is not None and not tc.is_kernel_default(root["handle"]):
                if not tc.is_ours(root["handle"]):
                    raise FailedPrecondition(
                        f"{where} has a root qdisc {root['kind']} {tc.handle_text(root['handle'])} that MECBench did "
                        "not install; refusing to replace it (remove it first)"
                    )
                if not any(r.egress for r in ours):
                    raise FailedPrecondition(
                        f"{where} has a MECBench root qdisc ({tc.handle_text(root['handle'])}) that this agent has no "
                        "record of (another agent's state directory?); refusing to replace it"
                    )
        if spec.ingress:
            slot = tc.find_ingress(ipr, ifindex)
            if slot is not None:
                redirect = tc.ingress_redirect_target(ipr, ifindex)
                if redirect is None or not any(r.ingress for r in ours):
                    raise FailedPrecondition(
                        f"{where} has an {slot['kind']} qdisc that MECBench did not install; refusing to replace it"
                    )
            ifb = ifb_name_for(ifindex)
            if ipr.link_lookup(ifname=ifb) and not any(r.ifb_name == ifb for r in ours):
                raise FailedPrecondition(
                    f"an interface named {ifb} already exists in {ns.label or 'the host namespace'}; "
                    "MECBench needs that name for the ifb device of the ingress shaping"
                )
        if ours and not spec.replace:
            held = ", ".join(f"{r.shaping_id} (owner {r.owner})" for r in ours)
            raise AlreadyExists(f"{where} is already shaped by MECBench: {held}; set replace to replace it")
        return ours

    def _install(
        self,
        ipr: Any,
        ns: Namespace,
        ifindex: int,
        mtu: int,
        spec: ShapingSpec,
        plan: tc.RootPlan,
        request: node_agent_pb2.ApplyShapingRequest,
    ) -> ShapingRecord:
        lease = self.store.create_lease(spec.owner, "shaping", spec.lease_s)
        record = ShapingRecord(
            shaping_id=new_id("shp"),
            lease_id=lease.lease_id,
            owner=spec.owner,
            state="installing",
            interface=spec.target.interface,
            ifindex=ifindex,
            netns_kind=ns.kind,
            netns_ref=ns.ref,
            netns_path=ns.path,
            netns_identity=ns.identity,
            egress=spec.egress,
            ingress=spec.ingress,
            ifb_name=ifb_name_for(ifindex) if spec.ingress else "",
            ifb_ifindex=0,
            request=request.SerializeToString(deterministic=True),
            created_at=time.time(),
        )
        # Written before anything is installed: a crash from here on leaves a record to clean up.
        self.store.add_shaping(record)
        ifb_index = 0
        try:
            if spec.egress:
                self._kernel(lambda: tc.install_root(ipr, ifindex, plan, mtu), "install the egress qdiscs")
                self._verify(ipr, ifindex, plan, spec.target.interface)
            if spec.ingress:
                ifb_index = self._kernel(lambda: self._create_ifb(ipr, record.ifb_name, mtu), "create the ifb device")
                self._kernel(lambda: tc.install_root(ipr, ifb_index, plan, mtu), "install the ingress qdiscs")
                self._verify(ipr, ifb_index, plan, record.ifb_name)
                self._kernel(lambda: tc.install_ingress_redirect(ipr, ifindex, ifb_index), "redirect ingress")
                if tc.ingress_redirect_target(ipr, ifindex) != ifb_index:
                    raise FailedPrecondition(f"the kernel does not report the ingress redirect to {record.ifb_name}")
        except BaseException:
            self._undo(ipr, record, ifb_index)
            self.store.delete_shaping(record.shaping_id)
            self.store.delete_lease(lease.lease_id)
            raise
        self.store.mark_installed(record.shaping_id, ifb_index)
        log.info(
            "shaping_applied", shaping_id=record.shaping_id, owner=spec.owner, interface=spec.target.interface,
            netns=ns.label, egress=spec.egress, ingress=spec.ingress, kinds=plan.kinds, lease_s=spec.lease_s,
        )
        return self.store.shaping(record.shaping_id) or record

    @staticmethod
    def _kernel(action: Callable[[], Any], what: str) -> Any:
        try:
            return action()
        except NetlinkError as exc:
            raise _kernel_error(what, exc) from None

    @staticmethod
    def _create_ifb(ipr: Any, name: str, mtu: int) -> int:
        ipr.link("add", ifname=name, kind="ifb")
        index = int(ipr.link_lookup(ifname=name)[0])
        ipr.link("set", index=index, mtu=mtu, state="up")
        return index

    @staticmethod
    def _verify(ipr: Any, ifindex: int, plan: tc.RootPlan, interface: str) -> None:
        """Compare the kernel's readback of the root with the plan."""
        readings = {r.handle: r for r in tc.read_qdiscs(ipr, ifindex)}
        root = readings.get(tc.ROOT_HANDLE)
        problems = []
        if plan.bpf_loss_percent:
            found = loss.installed_percent(ipr, ifindex)
            if found is None or abs(found - plan.bpf_loss_percent) > 1e-6:
                problems.append(f"the bpf drop reads back as {found}%, expected {plan.bpf_loss_percent}%")
        if not plan.root_kind:
            pass
        elif root is None or root.kind != plan.root_kind:
            problems.append(f"root is {root.kind if root else 'missing'}, expected {plan.root_kind}")
        elif plan.rate_bytes and root.params.get("rate_bps") != str(plan.rate_bytes * 8):
            problems.append(f"rate reads back as {root.params.get('rate_bps')} bit/s, expected {plan.rate_bytes * 8}")
        if plan.netem is not None:
            netem = readings.get(tc.LEAF_HANDLE if plan.rate_bytes else tc.ROOT_HANDLE)
            expected_us = plan.netem.delay_ns // 1000
            if netem is None or netem.kind != "netem":
                problems.append("netem is missing")
            elif abs(int(netem.params.get("delay_us", "-1")) - expected_us) > 1:
                problems.append(f"netem delay reads back as {netem.params.get('delay_us')}us, expected {expected_us}us")
        if problems:
            raise FailedPrecondition(
                f"the kernel's readback of {interface} differs from the request: {'; '.join(problems)}"
            )

    def _undo(self, ipr: Any, record: ShapingRecord, ifb_index: int) -> None:
        """Best-effort rollback of a failed install (only what is ours)."""
        try:
            if record.ingress:
                tc.delete_ingress_redirect(ipr, record.ifindex)
                if ifb_index:
                    ipr.link("del", index=ifb_index)
            if record.egress:
                tc.delete_root(ipr, record.ifindex)
        except Exception:
            log.exception("rollback_failed", shaping_id=record.shaping_id)

    # --- removal ------------------------------------------------------------------------------

    def _namespace_of(self, record: ShapingRecord) -> Namespace:
        return namespace_from_record(record.netns_kind, record.netns_ref, record.netns_path, record.netns_identity)

    def _remove(self, record: ShapingRecord) -> None:
        """Remove what `record` installed (only qdiscs and devices that are ours) and forget it."""
        self.stop_schedule(record.shaping_id, missing_ok=True)
        try:
            with self._namespace_of(record).netlink() as ipr:
                if _link(ipr, record.ifindex) is not None:
                    if record.egress:
                        tc.delete_root(ipr, record.ifindex)
                    if record.ingress:
                        tc.delete_ingress_redirect(ipr, record.ifindex)
                if record.ifb_name:
                    for index in ipr.link_lookup(ifname=record.ifb_name):
                        link = _link(ipr, index)
                        if link is not None and _link_kind(link) == "ifb":
                            ipr.link("del", index=index)
        except NamespaceGone as exc:
            log.info("shaping_namespace_gone", shaping_id=record.shaping_id, reason=str(exc))
        self.store.delete_shaping(record.shaping_id)
        log.info("shaping_removed", shaping_id=record.shaping_id, owner=record.owner, interface=record.interface)

    def remove_lease(self, lease: LeaseRecord) -> list[str]:
        with self._lock:
            removed = []
            for record in self.store.shapings_of_lease(lease.lease_id):
                self._remove(record)
                removed.append(record.shaping_id)
            self.store.delete_lease(lease.lease_id)
            return removed

    def clear(self, request: node_agent_pb2.ClearShapingRequest) -> list[str]:
        """Idempotent: clearing what is not there succeeds with nothing cleared."""
        which = request.WhichOneof("selector")
        if which is None:
            raise InvalidArgument("set one of shaping_id, target or owner", field="selector")
        with self._lock:
            records = self.store.shapings()
            if which == "shaping_id":
                chosen = [r for r in records if r.shaping_id == request.shaping_id]
            elif which == "owner":
                if not request.owner:
                    raise InvalidArgument("must not be empty", field="owner")
                chosen = [r for r in records if r.owner == request.owner]
            else:
                violations = Violations()
                target = check_target(request.target, "target", violations)
                violations.raise_if_any()
                try:
                    ns = self.resolve_namespace(target)
                except NotFound:
                    return []  # the namespace is gone, and with it anything installed there
                chosen = [
                    r for r in records if r.netns_identity == ns.identity and r.interface == target.interface
                ]
            for record in chosen:
                self._remove(record)
                if not self.store.shapings_of_lease(record.lease_id):
                    self.store.delete_lease(record.lease_id)
            return [r.shaping_id for r in chosen]

    def reconcile(self) -> list[str]:
        """At start: remove recorded shaping whose lease is not live; touch nothing else."""
        now = time.time()
        removed = []
        with self._lock:
            for record in self.store.shapings():
                lease = self.store.get_lease(record.lease_id)
                if lease is None or not lease.live(now):
                    self._remove(record)
                    removed.append(record.shaping_id)
            for lease in self.store.leases():
                if lease.kind == "shaping" and not lease.live(now) and not self.store.shapings_of_lease(lease.lease_id):
                    self.store.delete_lease(lease.lease_id)
        if removed:
            log.info("reconciled", removed=removed)
        return removed

    def renew(self, lease_id: str, duration: Any) -> LeaseRecord:
        violations = Violations()
        if not lease_id:
            violations.add("lease_id", "required")
        seconds = check_lease(duration, "lease_duration", self.settings, violations)
        violations.raise_if_any()
        lease = self.store.renew_lease(lease_id, seconds)
        if lease is None:
            raise NotFound(f"lease {lease_id} is unknown or has lapsed (what it held is removed)")
        return lease

    # --- reading back -------------------------------------------------------------------------

    def _message(self, record: ShapingRecord, ipr: Any | None = None) -> node_agent_pb2.Shaping:
        request = node_agent_pb2.ApplyShapingRequest.FromString(record.request)
        lease = self.store.get_lease(record.lease_id)
        shaping = node_agent_pb2.Shaping(
            shaping_id=record.shaping_id,
            target=request.target,
            direction=request.direction or common_pb2.DIRECTION_EGRESS,
            netem=request.netem,
            ifb_interface=record.ifb_name,
        )
        if lease is not None:
            shaping.lease.CopyFrom(lease_message(lease))
        ns = self._namespace_of(record)
        try:
            with self._netlink(ns, ipr) as link:
                shaping.qdiscs.extend(self._owned_qdiscs(link, ns, record))
        except NamespaceGone:
            pass  # nothing of it is left in the kernel to report
        return shaping

    @contextmanager
    def _netlink(self, ns: Namespace, ipr: Any | None) -> Iterator[Any]:
        if ipr is not None:
            yield ipr
            return
        with ns.netlink() as fresh:
            yield fresh

    @staticmethod
    def _installed(
        ns: Namespace, interface: str, reading: tc.QdiscReading, owned: bool
    ) -> node_agent_pb2.InstalledQdisc:
        return node_agent_pb2.InstalledQdisc(
            interface=interface,
            netns=ns.label,
            kind=reading.kind,
            handle=tc.handle_text(reading.handle),
            parent=tc.parent_text(reading.parent),
            params=reading.params,
            owned=owned,
            counters=node_agent_pb2.QdiscCounters(**reading.counters.__dict__),
        )

    def _owned_qdiscs(self, ipr: Any, ns: Namespace, record: ShapingRecord) -> list[node_agent_pb2.InstalledQdisc]:
        found = []
        if _link(ipr, record.ifindex) is not None:
            redirect = tc.ingress_redirect_target(ipr, record.ifindex) if record.ingress else None
            drop = loss.installed_percent(ipr, record.ifindex) if record.egress else None
            for reading in tc.read_qdiscs(ipr, record.ifindex):
                if record.egress and tc.is_ours(reading.handle):
                    found.append(self._installed(ns, record.interface, reading, True))
                elif drop is not None and reading.kind == "clsact":
                    reading.params.update(loss_readback(drop))
                    found.append(self._installed(ns, record.interface, reading, True))
                elif record.ingress and reading.parent == tc.TC_H_INGRESS and redirect is not None:
                    reading.params["redirect_to"] = record.ifb_name
                    found.append(self._installed(ns, record.interface, reading, True))
        if record.ifb_name:
            for index in ipr.link_lookup(ifname=record.ifb_name):
                drop = loss.installed_percent(ipr, int(index))
                for reading in tc.read_qdiscs(ipr, int(index)):
                    if tc.is_ours(reading.handle):
                        found.append(self._installed(ns, record.ifb_name, reading, True))
                    elif drop is not None and reading.kind == "clsact":
                        reading.params.update(loss_readback(drop))
                        found.append(self._installed(ns, record.ifb_name, reading, True))
        return found

    def list_all(self, include_foreign: bool) -> node_agent_pb2.ListShapingResponse:
        with self._lock:
            records = self.store.shapings()
            response = node_agent_pb2.ListShapingResponse(
                shapings=[self._message(r) for r in records if r.state == "installed"]
            )
            if include_foreign:
                response.foreign.extend(self._foreign(records))
            return response

    def _foreign(self, records: list[ShapingRecord]) -> list[node_agent_pb2.InstalledQdisc]:
        """Qdiscs not held by a record of this agent, in the host namespace and every namespace
        a record names. Ones carrying a MECBench handle without a record are reported owned."""
        namespaces: dict[str, Namespace] = {}
        host = host_namespace()
        namespaces[host.identity] = host
        for r in records:
            namespaces.setdefault(r.netns_identity, self._namespace_of(r))
        held = {(r.netns_identity, r.ifindex) for r in records}
        ifbs = {(r.netns_identity, r.ifb_name) for r in records if r.ifb_name}
        foreign = []
        for ns in namespaces.values():
            try:
                with ns.netlink() as ipr:
                    for link in ipr.get_links():
                        name = link.get_attr("IFLA_IFNAME")
                        if (ns.identity, name) in ifbs:
                            continue
                        index = int(link["index"])
                        redirect = tc.ingress_redirect_target(ipr, index) if (ns.identity, index) in held else None
                        for reading in tc.read_qdiscs(ipr, index):
                            if (ns.identity, index) in held and (
                                tc.is_ours(reading.handle) or (reading.parent == tc.TC_H_INGRESS and redirect)
                                or (reading.kind == "clsact" and loss.installed_percent(ipr, index) is not None)
                            ):
                                continue
                            foreign.append(self._installed(ns, name, reading, tc.is_ours(reading.handle)))
            except NamespaceGone:
                continue
        return foreign

    # --- probing ------------------------------------------------------------------------------

    def probe(self, request: node_agent_pb2.ProbeShapingRequest) -> node_agent_pb2.LinkProbe:
        """Measure the link a shaping sits on (see linkprobe) and judge it against the request."""
        violations = Violations()
        if not request.shaping_id:
            violations.add("shaping_id", "required")
        if request.peer_address:
            try:
                if ipaddress.ip_address(request.peer_address).version != 4:
                    violations.add("peer_address", "must be an IPv4 address")
            except ValueError:
                violations.add("peer_address", "is not an IP address")
        window_s = durations.to_seconds(request.duration) if request.HasField("duration") else 0.5
        violations.check(0 < window_s <= 5, "duration", "must be more than 0 and at most 5 s")
        violations.raise_if_any()
        record = self.store.shaping(request.shaping_id)
        if record is None or record.state != "installed":
            raise NotFound(f"shaping {request.shaping_id} is unknown (lapsed or cleared?)")
        asked = node_agent_pb2.ApplyShapingRequest.FromString(record.request)
        ns = self._namespace_of(record)
        probe = node_agent_pb2.LinkProbe(
            shaping_id=record.shaping_id, interface=record.interface, netns=ns.label,
            requested_rate_bps=asked.netem.rate_bps,
        )
        if asked.netem.HasField("delay"):
            probe.requested_delay.CopyFrom(asked.netem.delay)
        if not record.egress:
            probe.as_requested = True
            probe.notes.append("ingress shaping: only an egress can be probed from its own side; not probed")
            return probe
        try:
            with ns.netlink() as ipr:
                peer = request.peer_address or linkprobe.peer_of(ipr, record.ifindex)
                if not peer:
                    raise FailedPrecondition(
                        f"no far end of {record.interface} found (no /30 or /31 address, no neighbour); "
                        "give peer_address"
                    )
                outcome = linkprobe.ProbeOutcome(peer_address=peer)
                rtts = linkprobe.measure_rtt(ns, peer)
                outcome.rtt_samples = len(rtts)
                outcome.rtt_s = statistics.median(rtts) if rtts else None
                if asked.netem.rate_bps:
                    outcome.measured_rate_bps, outcome.offered_rate_bps = linkprobe.measure_rate(
                        ns, ipr, record.ifindex, peer, float(asked.netem.rate_bps), window_s
                    )
                    linkprobe.judge_rate(outcome, float(asked.netem.rate_bps))
                else:
                    outcome.notes.append("rate: none asked, not measured")
                if asked.netem.loss_percent:
                    probe.requested_loss_percent = asked.netem.loss_percent
                    probe.loss_mechanism = "bpf" if loss.installed_percent(ipr, record.ifindex) is not None else "netem"
                    measured, packets = linkprobe.measure_loss(
                        ns, ipr, record.ifindex, peer, float(asked.netem.rate_bps), max(window_s, 1.0)
                    )
                    probe.measured_loss_percent = measured
                    linkprobe.judge_loss(outcome, asked.netem.loss_percent, measured, packets)
                delay_s = durations.to_seconds(asked.netem.delay)
                if delay_s > 0:
                    linkprobe.judge_delay(outcome, delay_s)
        except NamespaceGone as exc:
            raise NotFound(f"shaping {record.shaping_id}: {exc}") from None
        except OSError as exc:
            raise FailedPrecondition(f"probing {record.interface} failed: {exc}") from None
        probe.peer_address = outcome.peer_address
        probe.measured_rate_bps = outcome.measured_rate_bps
        probe.offered_rate_bps = outcome.offered_rate_bps
        probe.saturated = outcome.saturated
        if outcome.rtt_s is not None:
            probe.rtt.CopyFrom(durations.from_seconds(outcome.rtt_s))
        probe.rtt_samples = outcome.rtt_samples
        probe.method = outcome.method
        probe.problems.extend(outcome.problems)
        probe.notes.extend(outcome.notes)
        probe.as_requested = not outcome.problems
        log.info("shaping_probed", shaping_id=record.shaping_id, measured_bps=round(outcome.measured_rate_bps),
                 rtt_s=outcome.rtt_s, problems=outcome.problems)
        return probe

    def interfaces_of_live_shaping(self) -> list[tuple[Namespace, str]]:
        """(namespace, interface) of every recorded shaping, and its ifb device, for telemetry."""
        result = []
        for r in self.store.shapings():
            ns = self._namespace_of(r)
            result.append((ns, r.interface))
            if r.ifb_name:
                result.append((ns, r.ifb_name))
        return result
