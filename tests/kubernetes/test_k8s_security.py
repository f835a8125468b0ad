"""The node agent and the agent pods on Kubernetes as the deployment configures them (issue 16):
mutual TLS from the deployment's Secrets admitting only the controller's certificate, tried for
real against a node agent started with the DaemonSet's own environment; the agent pods the
backend makes get their certificates and MECBENCH_TLS_*; the default host allowlist leaves
other containers' veths alone; leases are bounded in hours."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from controller.backends import k8s_objects as objects
from mecbench.core.tls import TlsSettings
from mecbench.v1 import common_pb2, node_agent_pb2, node_agent_pb2_grpc, sut_agent_pb2
from node_agent.server import create_server
from node_agent.settings import NodeAgentSettings
from tests.kubernetes.test_objects import CTX, SUT_CONFIGS
from tests.security.ca import CertificateAuthority, Identity

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _container_env(manifest: Path, kind: str) -> tuple[dict[str, str], dict[str, Any]]:
    doc = next(d for d in yaml.safe_load_all(manifest.read_text()) if d and d["kind"] == kind)
    container = doc["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}, doc


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("k8s-ca"))


def _agent_identity(ca: CertificateAuthority) -> Identity:
    """The agents' certificate as docs/kubernetes.md makes it: the name the controller checks."""
    return ca.issue("mecbench-agent", sans=("DNS:mecbench-agent",))


def _secret(directory: Path, identity: Identity) -> Path:
    """A kubernetes.io/tls Secret as mounted (cert-manager's keys: tls.crt, tls.key, ca.crt)."""
    directory.mkdir(parents=True)
    shutil.copy(identity.cert, directory / "tls.crt")
    shutil.copy(identity.key, directory / "tls.key")
    shutil.copy(identity.ca, directory / "ca.crt")
    return directory


@pytest.fixture
def node_agent_as_deployed(ca: CertificateAuthority, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A node agent with the DaemonSet's TLS environment, its Secret mounted at the DaemonSet's
    path (here: a directory standing for it)."""
    env, doc = _container_env(DEPLOY / "base" / "node-agent.yaml", "DaemonSet")
    [mount] = [m for m in doc["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] if m["name"] == "tls"]
    [volume] = [v for v in doc["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == "mecbench-agent-tls"
    secret = _secret(tmp_path / "mecbench-agent-tls", _agent_identity(ca))
    for name, value in env.items():
        if name.startswith("MECBENCH_TLS_") or "_TLS_" in name:
            monkeypatch.setenv(name, value.replace(mount["mountPath"], str(secret)))
    settings = NodeAgentSettings.load(state_dir=tmp_path / "state", probe_kernel=False)
    running, _port = create_server("127.0.0.1:0", settings)
    try:
        yield running.address
    finally:
        running.stop(grace=1)


def _call(address: str, ca: CertificateAuthority, identity: Identity | None) -> grpc.StatusCode:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert.read_bytes(),
        private_key=identity.key.read_bytes() if identity else None,
        certificate_chain=identity.cert.read_bytes() if identity else None,
    )
    # Dialled by IP, as the controller does: the agents' certificate is checked for its name.
    options = [("grpc.ssl_target_name_override", "mecbench-agent")]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        try:
            node_agent_pb2_grpc.NodeAgentStub(channel).GetNodeInfo(node_agent_pb2.GetNodeInfoRequest(), timeout=10)
        except grpc.RpcError as exc:
            code = exc.code()
            assert isinstance(code, grpc.StatusCode)
            return code
    return grpc.StatusCode.OK


def test_the_deployed_node_agent_admits_only_the_controllers_certificate(
    node_agent_as_deployed: str, ca: CertificateAuthority, tmp_path: Path,
) -> None:
    controller_env, _ = _container_env(DEPLOY / "base" / "controller.yaml", "Deployment")
    assert controller_env["MECBENCH_TLS_SERVER_NAME"] == "mecbench-agent"
    assert _call(node_agent_as_deployed, ca, ca.issue("mecbench-controller")) == grpc.StatusCode.OK
    # Another certificate of the same CA (a SUT or LoadGen agent's, a tenant's), none at all, or
    # the controller's name from a CA nobody trusts: refused.
    assert _call(node_agent_as_deployed, ca, _agent_identity(ca)) == grpc.StatusCode.PERMISSION_DENIED
    assert _call(node_agent_as_deployed, ca, None) == grpc.StatusCode.UNAVAILABLE
    stranger = CertificateAuthority(tmp_path / "other-ca", name="Somebody else's CA").issue("mecbench-controller")
    assert _call(node_agent_as_deployed, ca, stranger) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(node_agent_as_deployed) as plaintext, pytest.raises(grpc.RpcError):
        node_agent_pb2_grpc.NodeAgentStub(plaintext).GetNodeInfo(node_agent_pb2.GetNodeInfoRequest(), timeout=5)


def test_every_agent_pod_gets_its_certificate_and_tls_settings() -> None:
    ctx = objects.ObjectContext(**{**CTX.__dict__, "tls_secret": "mecbench-agent-tls"})
    pods = {
        "sut-agent": objects.sut_pod(ctx, "mecbench-a-sut-000001", "sut-a", SUT_CONFIGS["external-sidecar"]),
        "loadgen-agent": objects.loadgen_pod(ctx, "mecbench-l-loadgen-000001", "loadgen-l", {}),
        "loadgen-job": objects.loadgen_job(ctx, "mecbench-j-job-000001", "job-j-r1-c0", {}, 60, 60)["spec"]["template"],
    }
    for what, pod in pods.items():
        spec = pod["spec"]
        assert {"name": "tls", "secret": {"secretName": "mecbench-agent-tls", "defaultMode": 0o444}} in spec["volumes"]
        agent = spec["containers"][0]
        assert {"name": "tls", "mountPath": objects.TLS_MOUNT, "readOnly": True} in agent["volumeMounts"]
        assert agent["readinessProbe"]["tcpSocket"] == {"port": objects.GRPC_PORT}
        env = {e["name"]: e["value"] for e in agent["env"]}
        service = "SUT" if what == "sut-agent" else "LOADGEN"
        tls = TlsSettings.load(service, environ={k: v.replace(objects.TLS_MOUNT, "/nonexistent") for k, v in env.items()
                                                 if k.startswith("MECBENCH_")} | {"MECBENCH_TLS_CERT": __file__,
                                                                                  "MECBENCH_TLS_KEY": __file__,
                                                                                  "MECBENCH_TLS_CA": __file__})
        assert tls.client_auth and tls.server_name == "mecbench-agent"
        expected = ("mecbench-controller", "mecbench-agent") if what == "sut-agent" else ("mecbench-controller",)
        assert tls.allowed_clients == expected
        # A server sidecar (an arbitrary image) never sees the agents' key.
        for other in spec["containers"][1:]:
            assert all(m["name"] != "tls" for m in other.get("volumeMounts", []))
    # Without the Secret configured: plaintext and the gRPC probe, as before.
    plain = objects.loadgen_pod(CTX, "mecbench-l-loadgen-000002", "loadgen-l", {})
    assert "grpc" in plain["spec"]["containers"][0]["readinessProbe"]
    assert all(v["name"] != "tls" for v in plain["spec"]["volumes"])


def test_the_default_host_allowlist_matches_only_mecbenchs_interfaces() -> None:
    from fnmatch import fnmatchcase

    settings = NodeAgentSettings()
    allowed = settings.host_interface_allowlist
    # Other tenants' pods on the node: containerd/flannel/kindnet veths, Calico, Cilium, Weave.
    for foreign in ("veth1a2b3c4d", "vethwe-bridge", "cali12345abcd", "lxc8f7e6d5c", "eth0", "cni0", "docker0"):
        assert not any(fnmatchcase(foreign, pattern) for pattern in allowed), foreign
    # What the netns topology makes on the host (controller/backends/topology.py: mb<name>m<i>, mb<name>d<i>).
    for ours in ("mbx1m0", "mbx1d2"):
        assert any(fnmatchcase(ours, pattern) for pattern in allowed), ours


def test_leases_are_bounded_in_hours(tmp_path: Path) -> None:
    settings = NodeAgentSettings.load(state_dir=tmp_path / "state", probe_kernel=False)
    assert settings.max_lease_s <= 24 * 3600
    running, _port = create_server("127.0.0.1:0", settings)
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = node_agent_pb2_grpc.NodeAgentStub(channel)
            request = node_agent_pb2.ApplyShapingRequest(
                target=node_agent_pb2.ShapingTarget(interface="mbx1m0"), direction=common_pb2.DIRECTION_EGRESS,
                netem=common_pb2.NetemConfig(rate_bps=10_000_000), owner="run-long",
            )
            request.lease_duration.seconds = 2 * 24 * 3600
            with pytest.raises(grpc.RpcError) as refused:
                stub.ApplyShaping(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "lease_duration" in str(refused.value.details())
    finally:
        running.stop(grace=1)


@pytest.mark.parametrize("service", ["sut-agent", "loadgen-agent", "sut-member"])
def test_agent_pods_as_made_admit_whom_they_should(service: str, ca: CertificateAuthority, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SUT (LoadGen) agent started with the environment of the pod the backend makes, its
    Secret at the mount path: the controller may call it; the agents' identity (a LoadGen
    dialling its SUT) only the SUT agent, not a cluster SUT's worker (`sut-member`, a SUT agent of
    a StatefulSet's pod template); another certificate of the CA neither."""
    from mecbench.v1 import loadgen_agent_pb2, loadgen_agent_pb2_grpc, sut_agent_pb2_grpc

    ctx = objects.ObjectContext(**{**CTX.__dict__, "tls_secret": "mecbench-agent-tls"})
    if service == "sut-agent":
        pod = objects.sut_pod(ctx, "mecbench-a-sut-000001", "sut-a", SUT_CONFIGS["plain"])
    elif service == "sut-member":
        from tests.kubernetes.conftest import cluster_config

        names = objects.cluster_names("c", "000001")
        pod = objects.worker_statefulset(ctx, names, "sut-c", cluster_config("w1"), 0)["spec"]["template"]
    else:
        pod = objects.loadgen_pod(ctx, "mecbench-l-loadgen-000001", "loadgen-l", {})
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    secret = _secret(tmp_path / "mecbench-agent-tls", _agent_identity(ca))
    for name, value in env.items():
        if name != objects.TCP_DATA_PLANE_ENV:  # this machine's port 50052 is not ours to take
            monkeypatch.setenv(name, value.replace(objects.TLS_MOUNT, str(secret)))
    if service in ("sut-agent", "sut-member"):
        from sut_agent.server import create_server as create_sut

        running, _ = create_sut("127.0.0.1:0")
    else:
        from loadgen_agent.server import create_server as create_loadgen

        running, _ = create_loadgen("127.0.0.1:0")

    def call(identity: Identity) -> grpc.StatusCode:
        credentials = grpc.ssl_channel_credentials(ca.cert.read_bytes(), identity.key.read_bytes(),
                                                   identity.cert.read_bytes())
        with grpc.secure_channel(running.address, credentials,
                                 options=[("grpc.ssl_target_name_override", "mecbench-agent")]) as channel:
            try:
                if service != "loadgen-agent":
                    sut_agent_pb2_grpc.SutAgentStub(channel).GetStatus(sut_agent_pb2.GetStatusRequest(), timeout=10)
                else:
                    loadgen_agent_pb2_grpc.LoadGenAgentStub(channel).ListSessions(
                        loadgen_agent_pb2.ListSessionsRequest(), timeout=10)
            except grpc.RpcError as exc:
                code = exc.code()
                assert isinstance(code, grpc.StatusCode)
                return code
        return grpc.StatusCode.OK

    try:
        assert call(ca.issue("mecbench-controller")) == grpc.StatusCode.OK
        agents = grpc.StatusCode.OK if service == "sut-agent" else grpc.StatusCode.PERMISSION_DENIED
        assert call(_agent_identity(ca)) == agents
        assert call(ca.issue("tenant")) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        running.stop(grace=1)
