"""The node agent's pod -> network namespace resolution, which lets shaping land on a pod's own
interface: by the pod UID in /proc/<pid>/cgroup (for real, with a process placed in a network
namespace and a `pod<uid>` cgroup made here) and by the container runtime's sandbox bundle; and
ApplyShaping with a pod target through a real node agent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mecbench.core.durations import from_seconds
from mecbench.core.errors import InvalidArgument, NotFound
from mecbench.v1 import common_pb2, node_agent_pb2
from node_agent.netns import resolve_named, resolve_path
from node_agent.podnetns import (
    ChainedPodResolver,
    PodNetnsSettings,
    RuntimeBundlePodResolver,
    make_pod_resolver,
    make_resolver,
)
from node_agent.pods import ProcCgroupPodResolver
from tests.conftest import requires_root
from tests.node_agent.conftest import AgentUnderTest, VethPair, node_agent, qdisc_kinds, veth_pair

__all__ = ["node_agent", "veth_pair"]  # fixtures used here, defined with the node agent's tests

UID = "0b7e3f52-9c1d-4e2a-8f6b-3d5c7a9e1f20"


# --- the runtime's sandbox records (no root needed) ---------------------------------------------


def _bundle(root: Path, sandbox: str, annotations: dict[str, str], netns_path: str = "", pid: int = 0,
            crio: bool = False) -> Path:
    bundle = root / sandbox / ("userdata" if crio else "")
    bundle.mkdir(parents=True, exist_ok=True)
    namespaces = [{"type": "pid"}, {"type": "network", **({"path": netns_path} if netns_path else {})}]
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.1.0", "annotations": annotations,
                                                    "linux": {"namespaces": namespaces}}))
    if pid:
        (bundle / ("pidfile" if crio else "init.pid")).write_text(str(pid))
    return bundle


def test_containerd_sandbox_names_its_network_namespace(tmp_path: Path) -> None:
    netns_file = tmp_path / "netns" / "cni-1234"
    netns_file.parent.mkdir()
    netns_file.touch()
    root = tmp_path / "k8s.io"
    _bundle(root, "aaa", {"io.kubernetes.cri.sandbox-uid": "another-pod"}, str(netns_file))
    _bundle(root, "bbb", {"io.kubernetes.cri.sandbox-uid": UID, "io.kubernetes.cri.container-type": "sandbox"},
            str(netns_file))
    resolver = RuntimeBundlePodResolver((tmp_path / "absent", root), tmp_path / "proc")
    assert resolver.resolve("mecbench", "p", UID) == str(netns_file)


def test_a_sandbox_whose_runtime_made_the_namespace_leads_to_its_init_process(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "4242" / "ns").mkdir(parents=True)
    (proc / "4242" / "ns" / "net").touch()
    root = tmp_path / "overlay-containers"
    _bundle(root, "ccc", {"io.kubernetes.pod.uid": UID}, pid=4242, crio=True)
    assert RuntimeBundlePodResolver((root,), proc).resolve("", "", UID) == str(proc / "4242" / "ns" / "net")


def test_unknown_pods_and_bad_uids(tmp_path: Path) -> None:
    resolver = RuntimeBundlePodResolver((tmp_path,), tmp_path)
    with pytest.raises(NotFound, match="no sandbox in the container runtime's state"):
        resolver.resolve("ns", "p", UID)
    with pytest.raises(InvalidArgument):
        resolver.resolve("ns", "p", "not-a-uid")


def test_auto_tries_proc_then_the_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    netns_file = tmp_path / "cni-x"
    netns_file.touch()
    root = tmp_path / "bundles"
    _bundle(root, "s", {"io.kubernetes.cri.sandbox-uid": UID}, str(netns_file))
    empty_proc = tmp_path / "proc"
    empty_proc.mkdir()
    monkeypatch.setenv("MECBENCH_NODE_AGENT_RUNTIME_BUNDLE_ROOTS", f"{tmp_path / 'none'},{root}")
    assert PodNetnsSettings.load().runtime_bundle_roots == (tmp_path / "none", root)
    resolver = make_pod_resolver("auto", empty_proc)
    assert isinstance(resolver, ChainedPodResolver)
    assert resolver.resolve("ns", "p", UID) == str(netns_file)
    other = "11111111-2222-3333-4444-555555555555"
    with pytest.raises(NotFound) as caught:
        resolver.resolve("ns", "p", other)
    assert "has no process on this node" in str(caught.value) and "container runtime" in str(caught.value)
    assert isinstance(make_resolver("runtime", empty_proc), RuntimeBundlePodResolver)
    with pytest.raises(InvalidArgument, match="known: proc, runtime, auto, disabled"):
        make_pod_resolver("cri", empty_proc)


# --- for real: a process in a network namespace, in a pod<uid> cgroup ---------------------------


def _writable_cgroup_parent() -> Path | None:
    """A cgroup hierarchy this process may make a child in: cgroup v2, or v1's pids controller."""
    for candidate in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/pids")):
        if (candidate / "cgroup.procs").exists() and os.access(candidate, os.W_OK):
            return candidate
    return None


@pytest.fixture
def pod_process(veth_pair: VethPair) -> Iterator[tuple[str, int, VethPair]]:
    """A process inside `veth_pair.right`'s namespace, in a cgroup named as the kubelet names a
    pod's (`.../kubepods/burstable/pod<uid>/`); (pod uid, pid, pair)."""
    parent = _writable_cgroup_parent()
    if parent is None:
        pytest.skip("no writable cgroup hierarchy to place a process in a pod<uid> cgroup")
    uid = str(uuid.uuid4())
    group = parent / f"mecbench-test-{uid[:8]}" / "kubepods" / "burstable" / f"pod{uid}"
    try:
        group.mkdir(parents=True)
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup under {parent}: {exc}")
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mecbench.core.netns import enter_netns\n"
         "enter_netns(sys.argv[1]); print('in', flush=True); time.sleep(120)", veth_pair.right],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "in"
        (group / "cgroup.procs").write_text(str(process.pid))
        yield uid, process.pid, veth_pair
    finally:
        process.kill()
        process.wait()
        for level in (group, group.parent, group.parent.parent, group.parent.parent.parent):
            try:
                level.rmdir()
            except OSError:
                break


@requires_root
def test_proc_resolver_finds_the_pods_namespace_by_its_uid(pod_process: tuple[str, int, VethPair]) -> None:
    uid, pid, pair = pod_process
    assert f"pod{uid}" in Path(f"/proc/{pid}/cgroup").read_text()
    path = ProcCgroupPodResolver(Path("/proc")).resolve("bench", "sut", uid)
    assert path == f"/proc/{pid}/ns/net"
    # The very namespace the process joined, by identity (device and inode), not by name.
    assert resolve_path(path, kind="pod", ref="bench/sut").identity == resolve_named(pair.right).identity
    assert make_pod_resolver("auto", Path("/proc")).resolve("bench", "sut", uid) == path


@requires_root
def test_runtime_resolver_with_a_real_named_namespace(tmp_path: Path, veth_pair: VethPair) -> None:
    netns_path = f"/var/run/netns/{veth_pair.right}"
    _bundle(tmp_path, "sandbox", {"io.kubernetes.cri.sandbox-uid": UID}, netns_path)
    path = RuntimeBundlePodResolver((tmp_path,)).resolve("bench", "sut", UID)
    assert resolve_path(path).identity == resolve_named(veth_pair.right).identity


@requires_root
def test_shaping_a_pod_through_the_node_agent(node_agent: AgentUnderTest,
                                              pod_process: tuple[str, int, VethPair]) -> None:
    uid, _pid, pair = pod_process
    target = node_agent_pb2.ShapingTarget(
        interface=pair.right_if, pod=node_agent_pb2.PodReference(namespace="mecbench", name="sut", uid=uid)
    )
    # A pod of another Kubernetes namespace is not the node agent's to shape.
    foreign = node_agent_pb2.ShapingTarget(
        interface=pair.right_if, pod=node_agent_pb2.PodReference(namespace="kube-system", name="sut", uid=uid)
    )
    with pytest.raises(grpc.RpcError) as refused:
        node_agent.stub.ApplyShaping(node_agent_pb2.ApplyShapingRequest(
            target=foreign, direction=common_pb2.DIRECTION_EGRESS,
            netem=common_pb2.NetemConfig(rate_bps=20_000_000), owner="run-pod", lease_duration=from_seconds(30),
        ))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reply = node_agent.stub.ApplyShaping(node_agent_pb2.ApplyShapingRequest(
        target=target, direction=common_pb2.DIRECTION_EGRESS,
        # A rate (tbf), which every kernel here has; netem is not everywhere.
        netem=common_pb2.NetemConfig(rate_bps=20_000_000), owner="run-pod", lease_duration=from_seconds(30),
    ))
    assert reply.shaping.target.pod.uid == uid
    # Installed inside the pod's namespace, on its interface, and reported as the pod's.
    assert "tbf" in qdisc_kinds(pair.right, pair.right_if)
    listed = node_agent.stub.ListShaping(node_agent_pb2.ListShapingRequest())
    assert {q.netns for s in listed.shapings for q in s.qdiscs} == {"pod:mecbench/sut"}
    node_agent.stub.ClearShaping(node_agent_pb2.ClearShapingRequest(owner="run-pod"))
    assert "tbf" not in qdisc_kinds(pair.right, pair.right_if)


# --- issue 20 (3): AppArmor's EACCES, conmon in the pod's cgroup, records as the DaemonSet mounts them


def _fake_proc(root: Path, pid: int, cgroup: str, netns: Path | None = None) -> Path:
    """/proc/<pid> as the resolver reads it: its cgroup file and ns/net (a link to `netns` when
    given: one file per namespace, so the same namespace has the same inode)."""
    entry = root / str(pid)
    (entry / "ns").mkdir(parents=True)
    (entry / "cgroup").write_text(cgroup)
    if netns is not None:
        os.link(netns, entry / "ns" / "net")
    else:
        (entry / "ns" / "net").touch()
    return entry


def test_a_host_network_process_in_the_pods_cgroup_is_not_the_pod(tmp_path: Path) -> None:
    """CRI-O with conmon_cgroup = "pod": conmon (started first, lower pid) sits in the pod's
    cgroup but in the host's network namespace. Shaping there would shape the node."""
    proc = tmp_path / "proc"
    host_netns = tmp_path / "host-netns"
    host_netns.touch()
    _fake_proc(proc, 1, "0::/init.scope\n", host_netns)
    pod_cgroup = f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
    _fake_proc(proc, 310, pod_cgroup + "crio-conmon-abc.scope\n", host_netns)
    sandbox = _fake_proc(proc, 322, pod_cgroup + "crio-abc.scope\n")
    assert ProcCgroupPodResolver(proc).resolve("mecbench", "p", UID) == str(sandbox / "ns" / "net")
    # A pod with only host-network processes (hostNetwork: true) has no namespace of its own here.
    other = "11111111-2222-3333-4444-555555555555"
    _fake_proc(proc, 400, f"0::/kubepods/besteffort/pod{other}/x\n", host_netns)
    with pytest.raises(NotFound, match="has no process on this node"):
        ProcCgroupPodResolver(proc).resolve("mecbench", "q", other)


@requires_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_eacces_on_the_pods_netns_falls_back_to_the_runtime_records(tmp_path: Path) -> None:
    """What containerd's AppArmor profile does to an agent on an Ubuntu node: the pod's process is
    found by its cgroup, but stat(/proc/<pid>/ns/net) is EACCES. That is not the end: the
    runtime's records name the namespace. The kernel's own EACCES stands in for the LSM's here:
    the agent runs without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, for which a mode-000 ns/ is shut."""
    proc = tmp_path / "proc"
    _fake_proc(proc, 1, "0::/init.scope\n")
    pause = _fake_proc(proc, 4242, f"0::/kubepods/besteffort/pod{UID}/cri-containerd-abc.scope\n")
    cni = tmp_path / "run" / "netns" / "cni-5f2a"
    cni.parent.mkdir(parents=True)
    cni.touch()
    bundles = tmp_path / "k8s.io"
    _bundle(bundles, "abc", {"io.kubernetes.cri.sandbox-uid": UID}, str(cni))
    (pause / "ns").chmod(0o000)
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from node_agent.podnetns import PodNetnsSettings, make_resolver\n"
        "from node_agent.pods import ProcCgroupPodResolver\n"
        "from mecbench.core.errors import MecbenchError\n"
        "proc, bundles, uid = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]\n"
        "auto = make_resolver('auto', proc, PodNetnsSettings(runtime_bundle_roots=(bundles,)))\n"
        "for name, resolver in (('auto', auto), ('proc', ProcCgroupPodResolver(proc))):\n"
        "    try:\n"
        "        print(name, resolver.resolve('mecbench', 'p', uid))\n"
        "    except MecbenchError as exc:\n"
        "        print(name, type(exc).__name__, exc)\n"
    )
    try:
        result = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", sys.executable, "-c", script,
             str(proc), str(bundles), UID],
            capture_output=True, text=True, timeout=60, check=False, cwd=Path(__file__).resolve().parents[2],
        )
    finally:
        (pause / "ns").chmod(0o755)
    assert result.returncode == 0, result.stderr
    auto_line, proc_line = result.stdout.splitlines()
    assert auto_line == f"auto {cni}"
    # Alone, the /proc resolver says why, and that it is not "no such pod".
    assert proc_line.startswith("proc FailedPrecondition") and "EACCES" in proc_line and "4242" in proc_line


def test_runtime_records_as_the_daemonset_mounts_them(tmp_path: Path) -> None:
    """The DaemonSet mounts each runtime's sandbox records and /var/run/netns at their host paths
    (a config.json names host paths); the resolver's default roots are exactly those mounts. The
    records are laid out here as each runtime writes them, under a stand-in root for '/'."""
    import yaml

    daemonset = next(doc for doc in yaml.safe_load_all(
        (Path(__file__).resolve().parents[2] / "deploy" / "base" / "node-agent.yaml").read_text())
        if doc and doc["kind"] == "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: host[m["name"]] for m in spec["containers"][0]["volumeMounts"] if m["name"] in host}
    from node_agent.podnetns import DEFAULT_BUNDLE_ROOTS

    for root in [*DEFAULT_BUNDLE_ROOTS, Path("/var/run/netns")]:
        assert mounts.get(str(root)) == str(root), f"{root} is not mounted at its host path"
    # As they are on a node: the same layout under `slash`, one sandbox per runtime.
    slash = tmp_path / "root"
    uids = {"containerd": "aaaaaaaa-0000-4000-8000-000000000001", "k3s": "aaaaaaaa-0000-4000-8000-000000000002",
            "crio": "aaaaaaaa-0000-4000-8000-000000000003"}
    netns_dir = slash / "var/run/netns"
    netns_dir.mkdir(parents=True)
    roots = tuple(slash / str(root).lstrip("/") for root in DEFAULT_BUNDLE_ROOTS)
    expected = {}
    for (runtime, uid), root in zip(uids.items(), roots, strict=True):
        netns = netns_dir / f"cni-{runtime}"
        netns.touch()
        key = "io.kubernetes.pod.uid" if runtime == "crio" else "io.kubernetes.cri.sandbox-uid"
        _bundle(root, f"{runtime}0123", {key: uid}, str(netns), crio=runtime == "crio")
        expected[uid] = str(netns)
    resolver = RuntimeBundlePodResolver(roots, slash / "proc")
    assert {uid: resolver.resolve("mecbench", "p", uid) for uid in uids.values()} == expected
