"""Cluster launch profiles: how the SUT agents of a cluster SUT start its runtime (a Ray cluster,
say) on every member before the head starts the server that spans them.

They live in the agent's profiles file (MECBENCH_SUT_SERVER_PROFILES) beside the server profiles,
under `clusters:` (examples/servers.yaml shows them); a request only names one
(`SutConfig.cluster.runtime`). A cluster profile has a `head` and a `worker` section, each shaped
like a server profile (command, env, cwd, ready, live, stop_*, ports), whose templates may also use:

  {host}         the address this member advertises to the others (from the controller's topology)
  {head_address} workers: host:port of the head's runtime (the head's `address`)
  {member}       the member's name ("head", or the worker's name)
  {member_dir}   a short, empty, private folder for the runtime's own files (Ray's --temp-dir)

`address` (default "{host}:{port}") is where a member's runtime listens: the head's is what the
workers join and what the server's launch profile gets as `{cluster_address}`. `members` is a
command the head runs to count the members its runtime reports (its output's last whole number):
the head serves only once that count reaches the cluster's size, so a cluster is probed as a whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mecbench.core.errors import FailedPrecondition
from sut_agent.external.profiles import (
    _PROFILE_KEYS,
    LaunchProfile,
    _kind,
    _ProfileReader,
    read_document,
)

MEMBER_PLACEHOLDERS = frozenset({"head_address", "member", "member_dir"})
MEMBERS_PLACEHOLDERS = frozenset({"cluster_address", "cluster_size", "python", "profile"})
_MEMBER_KEYS = (_PROFILE_KEYS - {"server_type", "endpoint", "host"}) | {"address"}
_CLUSTER_KEYS = frozenset({"head", "worker", "members", "join_timeout_s"})
_MEMBERS_KEYS = frozenset({"command", "interval_s", "timeout_s"})
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_JOIN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class MembersCheck:
    """A command the head runs to count the members its runtime reports."""

    command: tuple[str, ...]
    interval_s: float = 1.0
    timeout_s: float = 30.0  # one run of the command


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    head: LaunchProfile  # `endpoint` holds the member's address template
    worker: LaunchProfile
    members: MembersCheck | None = None
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S


def load_cluster_profiles(path: Path) -> dict[str, ClusterProfile]:
    """Every cluster profile of a profiles file (its `clusters` section; none is no error).
    Bad content raises FailedPrecondition naming each `clusters.NAME.KEY` and why."""
    document = read_document(path)
    problems: list[str] = []
    found: dict[str, ClusterProfile] = {}
    entries = document.get("clusters", {}) if isinstance(document, Mapping) else {}
    if not isinstance(entries, Mapping):
        problems.append("clusters: must be a mapping of cluster profile name to profile")
        entries = {}
    for name, raw in entries.items():
        profile = _read_cluster(str(name), raw, problems)
        if profile is not None:
            found[profile.name] = profile
    if problems:
        raise FailedPrecondition(f"server profiles {path}: " + "; ".join(problems))
    return found


def _check_keys(where: str, raw: Mapping[str, object], known: Iterable[str], problems: list[str]) -> None:
    """One problem for each key of `raw` that is not `known`, naming it and the known ones."""
    names = sorted(known)
    problems.extend(f"{where}.{key}: unknown key (known: {', '.join(names)})" for key in raw if key not in names)


def _read_cluster(name: str, raw: object, problems: list[str]) -> ClusterProfile | None:
    where = f"clusters.{name}"
    before = len(problems)
    if not _PROFILE_NAME.fullmatch(name):
        problems.append(f"{where}: a profile name is 1-64 letters, digits, '_', '.' or '-'")
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping with `head` and `worker`")
        return None
    _check_keys(where, raw, _CLUSTER_KEYS, problems)
    members = {role: _read_member(name, role, raw.get(role), problems) for role in ("head", "worker")}
    check = _read_members_check(where, raw.get("members"), problems)
    join_timeout = raw.get("join_timeout_s", DEFAULT_JOIN_TIMEOUT_S)
    if isinstance(join_timeout, bool) or not isinstance(join_timeout, int | float) or not 0 < join_timeout <= 86400:
        problems.append(f"{where}.join_timeout_s: must be above 0 to 86400 seconds, not {_kind(join_timeout)}")
        join_timeout = DEFAULT_JOIN_TIMEOUT_S
    head, worker = members["head"], members["worker"]
    if len(problems) > before or head is None or worker is None:
        return None
    return ClusterProfile(name, head, worker, check, float(join_timeout))


def _read_member(cluster: str, role: str, raw: object, problems: list[str]) -> LaunchProfile | None:
    if raw is None:
        problems.append(f"clusters.{cluster}.{role}: is required (the {role}'s command, ready probe, stop)")
        return None
    section: Any = raw
    if isinstance(raw, Mapping):
        _check_keys(f"clusters.{cluster}.{role}", raw, _MEMBER_KEYS, problems)
        # A member's `address` is read as a server profile's endpoint (same templates, no scheme).
        section = {("endpoint" if key == "address" else key): value for key, value in raw.items()
                   if key in _MEMBER_KEYS}
        section.setdefault("endpoint", "{host}:{port}")
        section.setdefault("ready", {"tcp": "{host}:{port}"})
    reader = _ProfileReader(role, section, problems, where=f"clusters.{cluster}", extra=MEMBER_PLACEHOLDERS)
    return reader.read()


def _read_members_check(where: str, raw: object, problems: list[str]) -> MembersCheck | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"{where}.members: must be a mapping with `command` (and interval_s, timeout_s)")
        return None
    _check_keys(f"{where}.members", raw, _MEMBERS_KEYS, problems)
    section: dict[str, object] = {"command": raw.get("command"), "ready": {"tcp": "127.0.0.1:1"}, "ports": 0}
    reader = _ProfileReader("members", section, problems, where=where, extra=MEMBERS_PLACEHOLDERS)
    parsed = reader.read()
    numbers = []
    for key, default in (("interval_s", 1.0), ("timeout_s", 30.0)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
            problems.append(f"{where}.members.{key}: must be above 0 to 3600 seconds, not {_kind(value)}")
            value = default
        numbers.append(float(value))
    if parsed is None:
        return None
    return MembersCheck(parsed.command, numbers[0], numbers[1])
