"""Client groups: a run's clients in groups, each group on its own network profile, all against
one SUT at once. Clients are numbered group after group in the order the groups are given; each
group's result pools its clients' results as a run pools all of them (controller/aggregate.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from controller.aggregate import aggregate_results
from controller.shaping import is_shaped
from mecbench.core.errors import InvalidArgument, Violations
from mecbench.core.latencies import Latencies
from mecbench.profiles import resolve_profile
from mecbench.v1 import common_pb2, controller_pb2

PointT = TypeVar("PointT", bound=Any)


@dataclass(frozen=True)
class GroupClients:
    name: str
    clients: tuple[int, ...]
    profile: common_pb2.NetworkProfile | None

    @property
    def profile_name(self) -> str:
        if self.profile is None:
            return "unshaped"
        return self.profile.name or ("custom" if is_shaped(self.profile) else "unshaped")


def resolve_groups(spec: controller_pb2.RunSpec, prefix: str = "spec") -> None:
    """Every group's profile that names a shipped one gets its figures (all unknown names at once)."""
    violations = Violations()
    for index, group in enumerate(spec.client_groups):
        if group.HasField("network"):
            try:
                group.network.CopyFrom(resolve_profile(group.network, f"{prefix}.client_groups[{index}].network"))
            except InvalidArgument as exc:
                violations.extend(exc.violations)
    violations.raise_if_any()


def groups_of(spec: controller_pb2.RunSpec) -> list[GroupClients]:
    groups, first = [], 0
    for group in spec.client_groups:
        indices = tuple(range(first, first + group.clients))
        first += group.clients
        groups.append(GroupClients(group.name, indices, group.network if group.HasField("network") else None))
    return groups


def client_profiles(spec: controller_pb2.RunSpec) -> list[common_pb2.NetworkProfile | None]:
    """The profile of each client: its group's, or the run's own for a run without groups."""
    if not spec.client_groups:
        return [spec.network if spec.HasField("network") else None] * spec.clients
    return [group.profile for group in groups_of(spec) for _ in group.clients]


def any_shaped(spec: controller_pb2.RunSpec) -> bool:
    return any(p is not None and is_shaped(p) for p in client_profiles(spec))


def network_label(spec: controller_pb2.RunSpec) -> str:
    """The run's network as results name it: its profile, or each group's ("slow=5g+fast=lte")."""
    if spec.client_groups:
        return "+".join(f"{g.name}={g.profile_name}" for g in groups_of(spec))
    return spec.network.name if spec.HasField("network") else ""


def group_results(
    spec: controller_pb2.RunSpec,
    results: Sequence[tuple[int, common_pb2.TestResult, Latencies | None]],
) -> list[controller_pb2.GroupResult]:
    """Each group's clients' results, pooled (percentiles merged from every sample where kept)."""
    found = []
    for group in groups_of(spec):
        mine = [(result, latencies) for client, result, latencies in results if client in group.clients]
        message = controller_pb2.GroupResult(
            name=group.name, clients=list(group.clients), network_profile=group.profile_name
        )
        if mine:
            message.result.CopyFrom(aggregate_results([r for r, _ in mine], [lat for _, lat in mine]))
        found.append(message)
    return found


# --- sweeps ------------------------------------------------------------------------------------


def mix_points(spec: controller_pb2.ExperimentSpec, points: list[PointT], violations: Violations) -> list[PointT]:
    """With `sweep.client_mixes`, each mix is a point in place of clients x network profiles: the
    expanded points (one per scenario, QPS and whatever else the sweep varies) are repeated for
    each mix, named by it, with its clients' total. Violations are added, not raised."""
    mixes = list(spec.sweep.client_mixes)
    if not mixes:
        return points
    violations.check(not spec.sweep.clients, "spec.sweep.clients", "not with client_mixes: each mix sets its clients")
    violations.check(not spec.sweep.network_profiles, "spec.sweep.network_profiles",
                     "not with client_mixes: each group has its own profile")
    violations.check(not spec.HasField("search"), "spec.search", "a peak search does not take client_mixes")
    names: set[str] = set()
    for index, mix in enumerate(mixes):
        where = f"spec.sweep.client_mixes[{index}]"
        if not mix.name or not mix.name.replace("-", "").replace("_", "").isalnum() or len(mix.name) > 40:
            violations.add(f"{where}.name", "1-40 letters, digits, '-' or '_'")
        elif mix.name in names:
            violations.add(f"{where}.name", f"{mix.name!r} names another mix too")
        names.add(mix.name)
        violations.check(bool(mix.groups), f"{where}.groups", "at least one group")
        run = controller_pb2.RunSpec(client_groups=mix.groups)
        try:
            resolve_groups(run, where.removeprefix("spec."))
        except InvalidArgument as exc:
            violations.extend(exc.violations)
    expanded = []
    for point in points:
        for mix in mixes:
            total = sum(g.clients for g in mix.groups) or 1
            expanded.append(dataclasses.replace(point, clients=total, profile=common_pb2.NetworkProfile(name=mix.name)))
    return expanded


def apply_mix(spec: controller_pb2.ExperimentSpec, mix_name: str, run: controller_pb2.RunSpec) -> None:
    """A point of a mix: its run gets the mix's groups in place of one network."""
    for mix in spec.sweep.client_mixes:
        if mix.name and mix.name == mix_name:
            run.ClearField("network")
            run.client_groups.extend(mix.groups)
            run.clients = sum(g.clients for g in mix.groups)
            return
