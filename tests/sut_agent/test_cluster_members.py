"""Cluster SUTs on the SUT agent's side, without Ray: the cluster launch profiles (the examples'
vLLM-over-Ray ones loaded and rendered: they were not run on a GPU here), the checks of a cluster
config and of StartMember, and a member's runtime process (a real process listening on a port)
started, counted, watched and stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from mecbench.core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from mecbench.core.sut_config import validate_config
from mecbench.v1 import sut_agent_pb2
from sut_agent.external.clusters import load_cluster_profiles
from sut_agent.external.profiles import load_profiles, port_values, render
from sut_agent.lifecycle import BackendManager
from sut_agent.members import MemberManager
from sut_agent.settings import SutAgentSettings

REPO = Path(__file__).resolve().parents[2]
LISTEN = ("import socket, sys, time; s = socket.create_server((sys.argv[1], int(sys.argv[2]))); "
          "print('member up', flush=True); time.sleep(3600)")


def cluster(*workers: str, runtime: str = "fake", join_s: int = 0) -> sut_agent_pb2.SutCluster:
    return sut_agent_pb2.SutCluster(
        runtime=runtime, workers=[sut_agent_pb2.SutMember(name=name) for name in workers],
        join_timeout=Duration(seconds=join_s),
    )


def write_profiles(path: Path, joined: int) -> Path:
    member = {"command": [sys.executable, "-c", LISTEN, "{host}", "{port}"], "stop_timeout_s": 2}
    document = {
        "profiles": {},
        "clusters": {
            "fake": {
                "head": member,
                "worker": {**member, "command": [*member["command"], "{head_address}"]},
                "members": {"command": [sys.executable, "-c", f"print('nodes: {joined}')"], "interval_s": 0.1},
                "join_timeout_s": 30,
            },
        },
    }
    path.write_text(json.dumps(document))
    return path


def test_the_example_cluster_profiles_load_and_render() -> None:
    examples = REPO / "examples" / "servers.yaml"
    servers = load_profiles(examples)
    values = {**port_values([8000]), "model": "Qwen/Qwen2.5-0.5B-Instruct", "model_dir": "/models",
              "cluster_address": "10.0.0.1:6379", "cluster_size": "2"}
    tp = render(servers["vllm-ray-tp"], values)
    assert tp.argv[:3] == ("vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct")
    assert tp.argv[-4:] == ("--distributed-executor-backend", "ray", "--tensor-parallel-size", "2")
    assert tp.env["RAY_ADDRESS"] == "10.0.0.1:6379"
    pp = render(servers["vllm-ray-pp"], values)
    assert pp.argv[-4:] == ("--tensor-parallel-size", "1", "--pipeline-parallel-size", "2")
    ray = load_cluster_profiles(examples)["ray"]
    member = {**port_values([6379]), "host": "10.0.0.2", "head_address": "10.0.0.1:6379", "member": "w1",
              "member_dir": "/tmp/x"}
    worker = render(ray.worker, member, untrusted=("host", "head_address", "member"))
    assert worker.argv[:4] == ("ray", "start", "--block", "--address=10.0.0.1:6379")
    assert "--node-ip-address=10.0.0.2" in worker.argv and worker.ready.target == "10.0.0.2:6379"
    head = render(ray.head, {**member, "host": "10.0.0.1"})
    assert head.endpoint == "10.0.0.1:6379" and "--head" in head.argv
    assert ray.members is not None and "{cluster_address}" in ray.members.command[2]
    # A server profile that needs a cluster cannot start without one, and says what it lacks.
    with pytest.raises(FailedPrecondition, match=r"\{cluster_address\}"):
        render(servers["vllm-ray-tp"], {**port_values([8000]), "model": "m", "model_dir": "/m"})


def test_a_bad_cluster_profile_is_refused_naming_each_key(tmp_path: Path) -> None:
    path = tmp_path / "servers.json"
    path.write_text(json.dumps({"clusters": {"bad": {
        "head": {"command": ["x", "{head_adress}"], "endpoint": "x"},
        "members": {"command": ["y"], "every": 1},
        "extra": 1,
    }}}))
    with pytest.raises(FailedPrecondition) as caught:
        load_cluster_profiles(path)
    message = str(caught.value)
    for expected in ("clusters.bad.extra: unknown key", "clusters.bad.head.command[1]: unknown placeholder {head_adress}",
                     "clusters.bad.head.endpoint: unknown key", "clusters.bad.worker: is required",
                     "clusters.bad.members.every: unknown key"):
        assert expected in message, message
    # The server profiles of the same file still load: `clusters` is a section of its own.
    assert load_profiles(path) == {}


def test_a_cluster_config_is_checked_as_a_whole() -> None:
    config = sut_agent_pb2.SutConfig(
        synthetic=sut_agent_pb2.SyntheticBackendConfig(),
        cluster=sut_agent_pb2.SutCluster(
            runtime="ray; rm", join_timeout=Duration(seconds=-1),
            workers=[sut_agent_pb2.SutMember(name="w1"), sut_agent_pb2.SutMember(name="w1"),
                     sut_agent_pb2.SutMember(name="head"), sut_agent_pb2.SutMember(name="W 2")],
        ),
    )
    fields = {v.field for v in validate_config(config).items}
    assert {"config.cluster.runtime", "config.cluster.workers[1].name", "config.cluster.workers[2].name",
            "config.cluster.workers[3].name", "config.cluster.join_timeout"} <= fields, fields
    empty = sut_agent_pb2.SutConfig(external=sut_agent_pb2.ExternalBackendConfig(profile="p", model="m"),
                                    cluster=sut_agent_pb2.SutCluster(runtime="ray"))
    assert [v.field for v in validate_config(empty).items] == ["config.cluster.workers"]


def test_member_requests_are_checked_before_anything_starts(tmp_path: Path) -> None:
    settings = SutAgentSettings(server_profiles=write_profiles(tmp_path / "servers.json", 2), server_log_dir=tmp_path)
    members = MemberManager(settings)
    bad = sut_agent_pb2.StartMemberRequest(
        cluster=cluster("w1"), role=sut_agent_pb2.MEMBER_ROLE_WORKER, member="w2", host="10.0.0.1 --x",
        head_address="10.0.0.1",
    )
    with pytest.raises(InvalidArgument) as caught:
        members.start(bad)
    assert {v.field for v in caught.value.violations} == {"member", "host", "head_address"}
    unknown = sut_agent_pb2.StartMemberRequest(
        cluster=cluster("w1", runtime="slurm"), role=sut_agent_pb2.MEMBER_ROLE_HEAD, member="head", host="127.0.0.1"
    )
    with pytest.raises(InvalidArgument, match="no cluster launch profile 'slurm'; this agent has: fake"):
        members.start(unknown)
    assert members.status() is None


def test_members_start_join_fail_and_stop(tmp_path: Path) -> None:
    profiles = write_profiles(tmp_path / "servers.json", 2)
    head = MemberManager(SutAgentSettings(server_profiles=profiles, server_log_dir=tmp_path / "head"))
    worker = MemberManager(SutAgentSettings(server_profiles=profiles, server_log_dir=tmp_path / "w1"))
    try:
        started = head.start(sut_agent_pb2.StartMemberRequest(
            cluster=cluster("w1"), role=sut_agent_pb2.MEMBER_ROLE_HEAD, member="head", host="127.0.0.1",
        ))
        assert started.state == sut_agent_pb2.BACKEND_STATE_READY and started.address.startswith("127.0.0.1:")
        joined = worker.start(sut_agent_pb2.StartMemberRequest(
            cluster=cluster("w1"), role=sut_agent_pb2.MEMBER_ROLE_WORKER, member="w1", host="127.0.0.1",
            head_address=started.address,
        ))
        assert joined.state == sut_agent_pb2.BACKEND_STATE_READY
        config = sut_agent_pb2.SutConfig(cluster=cluster("w1"))
        assert head.wait_joined(config) == {"cluster_address": started.address, "cluster_size": "2"}
        status = head.status()
        assert status is not None and status.members_joined == 2
        # A worker only joins: it is no head to serve from.
        with pytest.raises(FailedPrecondition, match="runs no cluster head"):
            worker.wait_joined(config)
        # The worker's node fails: its process group dies, and the member says so.
        os.killpg(joined.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10  # the watcher reports on its own thread
        while worker.failure() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        failed = worker.status()
        assert failed is not None
        assert failed.state == sut_agent_pb2.BACKEND_STATE_FAILED, failed
        assert "exited with code -9 (SIGKILL)" in failed.message and "member up" in failed.message
    finally:
        for member in (worker, head):
            member.stop()
    stopped = head.status()
    assert stopped is not None and stopped.state == sut_agent_pb2.BACKEND_STATE_STOPPED
    with pytest.raises(ProcessLookupError):
        os.kill(started.pid, 0)


def test_the_head_serves_only_once_every_member_joined(tmp_path: Path) -> None:
    profiles = write_profiles(tmp_path / "servers.json", 1)
    manager = BackendManager(SutAgentSettings(server_profiles=profiles, server_log_dir=tmp_path))
    try:
        config = sut_agent_pb2.SutConfig(
            external=sut_agent_pb2.ExternalBackendConfig(endpoint="http://127.0.0.1:1", model="m", server_type="openai"),
            cluster=cluster("w1", join_s=1),
        )
        with pytest.raises(FailedPrecondition, match="runs no cluster head"):
            manager.start(config, restart=False)
        manager.members.start(sut_agent_pb2.StartMemberRequest(
            cluster=cluster("w1", join_s=1), role=sut_agent_pb2.MEMBER_ROLE_HEAD, member="head", host="127.0.0.1",
        ))
        with pytest.raises(DeadlineExceeded, match="the runtime reports 1 of 2 members"):
            manager.start(config, restart=False)
        assert manager.status().member.members_joined == 1
    finally:
        manager.close()


GRANDCHILD = """
import os, subprocess, sys, time
# A process of the session that moved to a group of its own (as Ray's workers do), and one that did not.
moved = subprocess.Popen([sys.executable, "-c", "import os, time; os.setpgid(0, 0); time.sleep(3600)"])
stays = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
print(moved.pid, stays.pid, flush=True)
time.sleep(3600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_tethered_command_ends_with_its_whole_session_when_the_agent_is_gone(tmp_path: Path) -> None:
    given = tmp_path / "runtime"  # the folder the agent gave the command, removed with it
    (given / "session").mkdir(parents=True)
    tether = subprocess.Popen(
        [sys.executable, "-m", "sut_agent.external.tether", "--remove", str(given), sys.executable, "-c", GRANDCHILD],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, cwd=REPO,
    )
    assert tether.stdout is not None
    pids = [int(p) for p in tether.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    # As when the agent dies by SIGKILL: the kernel closes the pipe it held.
    assert tether.stdin is not None
    tether.stdin.close()
    assert tether.wait(10) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _alive(pid)]
    assert not given.exists()


def test_a_tethered_command_stops_and_exits_as_its_command_did() -> None:
    # Its stdin stays open, as the agent holds it: the command's own exit is what ends it.
    done = subprocess.Popen([sys.executable, "-m", "sut_agent.external.tether", sys.executable, "-c",
                             "raise SystemExit(3)"], stdin=subprocess.PIPE, cwd=REPO)
    assert done.wait(30) == 3
    sleeper = subprocess.Popen(
        [sys.executable, "-m", "sut_agent.external.tether", sys.executable, "-c",
         "import time; print('up', flush=True); time.sleep(3600)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, cwd=REPO,
    )
    assert sleeper.stdout is not None and sleeper.stdout.readline() == b"up\n"
    # The agent's stop signal goes to the group: the command ends by it, and the tether says so.
    os.killpg(sleeper.pid, signal.SIGTERM)
    assert sleeper.wait(10) == -signal.SIGTERM
