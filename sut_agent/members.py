"""This SUT agent's member of a cluster SUT: the runtime process (a Ray head or worker, say) of a
cluster launch profile, started behind StartMember, watched, and stopped behind StopMember.

The head's agent also serves: before its backend starts, `wait_joined` runs the profile's
`members` check until the runtime reports every member (sut_agent/external/clusters.py), and the
server's launch profile gets `{cluster_address}` and `{cluster_size}`. Plain Python, no gRPC.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from mecbench.core import durations
from mecbench.core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Violations
from mecbench.core.logging import get_logger
from mecbench.core.sut_config import HEAD_MEMBER, validate_cluster
from mecbench.v1 import sut_agent_pb2
from sut_agent.external.clusters import ClusterProfile, load_cluster_profiles
from sut_agent.external.process import ServerProcess
from sut_agent.external.profiles import LaunchProfile, ProbeTemplate, allocate_ports, port_values, render
from sut_agent.settings import SutAgentSettings

log = get_logger("sut_agent.members")

# An address the controller gives: an IP address or a DNS name, and for the head's a port.
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[?[0-9A-Fa-f:.]{2,45}\]?")
_HEAD_ADDRESS = re.compile(r"(?P<host>.+):(?P<port>[0-9]{1,5})")
_LAST_NUMBER = re.compile(r"(\d+)\s*$")


def check_member_request(request: sut_agent_pb2.StartMemberRequest) -> None:
    """INVALID_ARGUMENT naming every bad field of a StartMember request; nothing starts."""
    violations = Violations()
    # The head's own SutConfig serves an external server; a member request carries only the cluster.
    validate_cluster(
        sut_agent_pb2.SutConfig(cluster=request.cluster, external=sut_agent_pb2.ExternalBackendConfig()),
        "cluster", violations,
    )
    names = [worker.name for worker in request.cluster.workers]
    if request.role == sut_agent_pb2.MEMBER_ROLE_HEAD:
        violations.check(request.member == HEAD_MEMBER, "member", f"the head's member name is {HEAD_MEMBER!r}")
        violations.check(not request.head_address, "head_address", "only a worker joins a head's address")
    elif request.role == sut_agent_pb2.MEMBER_ROLE_WORKER:
        violations.check(request.member in names, "member", f"must name one of cluster.workers ({', '.join(names)})")
        match = _HEAD_ADDRESS.fullmatch(request.head_address)
        violations.check(
            match is not None and bool(_HOST.fullmatch(match["host"])) and 0 < int(match["port"]) < 65536,
            "head_address", "must be the head's host:port (its MemberStatus.address)",
        )
    else:
        violations.add("role", "must be MEMBER_ROLE_HEAD or MEMBER_ROLE_WORKER")
    violations.check(bool(_HOST.fullmatch(request.host)), "host", "must be an IP address or a DNS name")
    violations.raise_if_any()


class MemberManager:
    """Holds at most one member process of this agent; thread-safe."""

    def __init__(self, settings: SutAgentSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._process: ServerProcess | None = None
        self._request = sut_agent_pb2.StartMemberRequest()
        self._profile: ClusterProfile | None = None
        self._address = ""
        self._members_joined = 0
        self._directory: Path | None = None
        self._message = ""
        self._failed = False

    @property
    def log_path(self) -> Path:
        assert self.settings.server_log_dir is not None
        return self.settings.server_log_dir / "member.log"

    def _cluster_profile(self, runtime: str) -> ClusterProfile:
        path = self.settings.server_profiles
        if path is None:
            raise InvalidArgument(
                "this SUT agent has no launch profiles (MECBENCH_SUT_SERVER_PROFILES is not set)",
                field="cluster.runtime",
            )
        profiles = load_cluster_profiles(path)
        profile = profiles.get(runtime)
        if profile is None:
            known = ", ".join(sorted(profiles)) or "none"
            raise InvalidArgument(f"no cluster launch profile {runtime!r}; this agent has: {known}",
                                  field="cluster.runtime")
        return profile

    def start(self, request: sut_agent_pb2.StartMemberRequest) -> sut_agent_pb2.MemberStatus:
        check_member_request(request)
        with self._lock:
            if self._process is not None:
                if request == self._request and self._process.running():
                    return self._status()
                raise FailedPrecondition(
                    f"member {self._request.member} of cluster {self._request.cluster.runtime} runs on this agent: "
                    "call StopMember first"
                )
            cluster = self._cluster_profile(request.cluster.runtime)
            head = request.role == sut_agent_pb2.MEMBER_ROLE_HEAD
            template = cluster.head if head else cluster.worker
            profile = dataclasses.replace(template, name=f"{cluster.name}-{request.member}")
            # Short: a runtime puts Unix sockets under it, whose paths may not exceed 107 bytes.
            directory = Path(tempfile.mkdtemp(prefix="mbm-"))
            values = {
                "host": request.host,
                "head_address": request.head_address,
                "member": request.member,
                "member_dir": str(directory),
                **port_values(allocate_ports(profile.ports, request.host)),
            }
            try:
                launch = render(profile, values, untrusted=("host", "head_address", "member"))
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                raise
            # Tethered: a worker agent killed outright takes its runtime (raylet, workers) with it.
            process = ServerProcess(launch, profile, self.log_path, on_failure=self._on_failure, tethered=True,
                                    tether_remove=directory)
            timeout_s = durations.to_seconds(request.cluster.join_timeout) or cluster.join_timeout_s
            self._failed, self._message, self._members_joined = False, "", 0
            try:
                process.start(min(timeout_s, profile.ready_timeout_s))
            except BaseException as exc:
                shutil.rmtree(directory, ignore_errors=True)
                self._failed, self._message = True, f"start failed: {exc}"
                raise
            self._process, self._profile, self._directory = process, cluster, directory
            self._request = sut_agent_pb2.StartMemberRequest()
            self._request.CopyFrom(request)
            self._address = launch.endpoint
            log.info("member_started", runtime=cluster.name, member=request.member, address=self._address,
                     pid=process.pid)
            return self._status()

    def _on_failure(self, message: str) -> None:
        log.warning("member_failed", member=self._request.member, reason=message.splitlines()[0])

    def wait_joined(self, config: sut_agent_pb2.SutConfig) -> dict[str, str]:
        """For the head: wait until the runtime reports every member of `config.cluster`, then
        return the server's cluster template values. FAILED_PRECONDITION when this agent is not a
        running head of that cluster; DEADLINE_EXCEEDED when the members do not all join in time."""
        with self._lock:
            process, profile, request = self._process, self._profile, self._request
        cluster = config.cluster
        if process is None or profile is None or request.role != sut_agent_pb2.MEMBER_ROLE_HEAD:
            raise FailedPrecondition("config.cluster: this agent runs no cluster head; call StartMember first")
        if request.cluster != cluster:
            raise FailedPrecondition("config.cluster: differs from the cluster this agent's head was started for")
        size = 1 + len(cluster.workers)
        values = {"cluster_address": self._address, "cluster_size": str(size)}
        check = profile.members
        if check is None:
            self._members_joined = size  # nothing to ask: each member's own probe passed
            return values
        launch = render(
            LaunchProfile(name=f"{profile.name}-members", command=check.command, ports=0, endpoint="",
                          ready=ProbeTemplate("tcp", "127.0.0.1:1")), values
        )
        timeout_s = durations.to_seconds(cluster.join_timeout) or profile.join_timeout_s
        deadline = time.monotonic() + timeout_s
        reason = "not checked yet"
        while True:
            if not process.running():
                raise FailedPrecondition(f"the cluster head stopped while members joined: {process.failure()}")
            joined, reason = self._count_members(list(launch.argv), launch.env, check.timeout_s)
            if joined is not None:
                self._members_joined = joined
                if joined >= size:
                    log.info("cluster_joined", runtime=profile.name, members=joined)
                    return values
                reason = f"the runtime reports {joined} of {size} members"
            if time.monotonic() + check.interval_s > deadline:
                raise DeadlineExceeded(f"cluster {profile.name}: not every member joined within {timeout_s:g}s "
                                       f"({reason})")
            time.sleep(check.interval_s)

    @staticmethod
    def _count_members(argv: list[str], env: dict[str, str], timeout_s: float) -> tuple[int | None, str]:
        try:
            done = subprocess.run(argv, env=env, capture_output=True, timeout=timeout_s,
                                  check=False, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"members check: {exc}"
        output = done.stdout.decode(errors="replace").strip()
        match = _LAST_NUMBER.search(output)
        if done.returncode != 0 or match is None:
            tail = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            return None, f"members check exited with code {done.returncode}: {tail[:300]}"
        return int(match.group(1)), ""

    def failure(self) -> str | None:
        process = self._process
        return process.failure() if process is not None else None

    def stop(self) -> sut_agent_pb2.MemberStatus | None:
        with self._lock:
            process, self._process = self._process, None
            directory, self._directory = self._directory, None
        if process is not None:
            process.stop()
            log.info("member_stopped", member=self._request.member)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        return self.status()

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_log(self, offset: int, limit: int = 0) -> bytes:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read(limit if limit > 0 else -1)
        except FileNotFoundError:
            return b""

    def _status(self) -> sut_agent_pb2.MemberStatus:
        status = self.status()
        assert status is not None
        return status

    def status(self) -> sut_agent_pb2.MemberStatus | None:
        """This agent's member, or None when it never ran one."""
        request, process = self._request, self._process
        if not request.member:
            return None
        status = sut_agent_pb2.MemberStatus(
            name=request.member, role=request.role, runtime=request.cluster.runtime, address=self._address,
            members_joined=self._members_joined, log_size=self.log_size(),
        )
        failure = process.failure() if process is not None else None
        if process is None:
            status.state = sut_agent_pb2.BACKEND_STATE_FAILED if self._failed else sut_agent_pb2.BACKEND_STATE_STOPPED
            status.message = self._message
        elif failure is not None:
            status.state, status.message, status.pid = sut_agent_pb2.BACKEND_STATE_FAILED, failure, process.pid
        else:
            status.state, status.pid = sut_agent_pb2.BACKEND_STATE_READY, process.pid
        return status
