"""`KubernetesApi`, the real ClusterApi, over HTTP against a stand-in API server on loopback:
the paths, verbs, content types, query parameters, authentication, chunked watch and log
streams and Status errors it exchanges with a real API server. (The whole backend against a
real cluster: MECBENCH_K8S_TEST_KUBECONFIG, see conftest.py.)"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from controller.backends.kubernetes import ClusterApiError, KubernetesApi
from mecbench.core.errors import FailedPrecondition
from tests.kubernetes.conftest import real_only

TOKEN = "test-token-123"


class StandInApiServer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]] = []
    client_left_streams = 0
    connections: set[socket.socket] = set()

    def setup(self) -> None:
        super().setup()
        StandInApiServer.connections.add(self.connection)

    def finish(self) -> None:
        StandInApiServer.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _record(self) -> tuple[str, dict[str, list[str]], Any]:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.seen.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                          "body": json.loads(json.dumps(body)),
                          "content_type": self.headers.get("Content-Type"),
                          "authorization": self.headers.get("Authorization")})
        return url.path, parse_qs(url.query), body

    def _send(self, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, chunks: list[bytes], hold_s: float = 0.0, cut: bool = False) -> None:
        """A chunked reply. As a real API server does with a watch, the stream then stays open
        for `hold_s` (its timeoutSeconds) with nothing more to say, unless the client goes first;
        `cut` ends it mid-way instead: the connection closes without the final chunk, as when the
        API server restarts or a proxy drops it."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()
            time.sleep(0.01)
        if cut:
            self.wfile.write(b"40\r\n" + b'{"type": "MODIFIED", "obj')  # a chunk promised, half sent
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        deadline = time.monotonic() + hold_s
        while (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.connection], [], [], min(remaining, 0.05))
            if readable:
                # The client closed the stream (or, misbehaving, sent its next request on it).
                StandInApiServer.client_left_streams += 1
                self.close_connection = True
                return
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message,
                "code": code}

    def do_POST(self) -> None:
        path, _, body = self._record()
        body["metadata"]["uid"] = "uid-1"
        body["metadata"]["resourceVersion"] = "5"
        self._send(201, body) if path.endswith("/pods") else self._send(404, self._status(404, "NotFound", path))

    def do_GET(self) -> None:
        path, query, _ = self._record()
        if path.endswith("/log"):
            # Pod "running": its container lives on, so a followed log stays open (as on a real
            # API server); the others' containers have exited: the log ends.
            running = "/pods/running/" in path and query.get("follow") == ["true"]
            self._stream([b"listening on 0.0.0.0:50051\n", b'{"event": "server_listening"}\n'],
                         hold_s=30.0 if running else 0.0)
        elif query.get("watch") == ["true"]:
            hold_s = float(query.get("timeoutSeconds", ["0"])[0])
            if query.get("resourceVersion") == ["1"]:
                self._stream([json.dumps({"type": "ERROR", "object": self._status(
                    410, "Expired", "too old resource version: 1 (9)")}).encode() + b"\n"])
                return
            pod = {"metadata": {"name": "p", "resourceVersion": "8"}, "status": {"phase": "Pending"}}
            ready = {"metadata": {"name": "p", "resourceVersion": "9"}, "status": {"phase": "Running"}}
            # One event split across chunks, two in one: lines, not chunks, delimit events.
            first = json.dumps({"type": "ADDED", "object": pod}).encode() + b"\n"
            second = json.dumps({"type": "MODIFIED", "object": ready}).encode() + b"\n"
            self._stream([first[:10], first[10:] + second], hold_s=hold_s,
                         cut=query.get("resourceVersion") == ["cut"])
        elif path == "/apis/leaderworkerset.x-k8s.io/v1":
            # Discovery of an installed CRD: its resources, subresources among them.
            self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": path[6:],
                             "resources": [{"name": "leaderworkersets", "namespaced": True, "kind": "LeaderWorkerSet"},
                                           {"name": "leaderworkersets/status", "namespaced": True,
                                            "kind": "LeaderWorkerSet"}]})
        elif path.startswith("/apis/") and path.count("/") == 3:
            # A group/version nobody serves (the CRD is not installed).
            self._send(404, self._status(404, "NotFound", "the server could not find the requested resource"))
        elif path == "/api/v1/namespaces/ns/pods/missing":
            self._send(404, self._status(404, "NotFound", 'pods "missing" not found'))
        elif path.endswith("/pods"):
            self._send(200, {"kind": "PodList", "metadata": {"resourceVersion": "7"},
                             "items": [{"metadata": {"name": "p"}}]})
        elif path == "/api/v1/nodes":
            self._send(200, {"kind": "NodeList", "metadata": {"resourceVersion": "3"},
                             "items": [{"metadata": {"name": "node-a"}}]})
        else:
            self._send(200, {"kind": "Pod", "metadata": {"name": path.rsplit("/", 1)[-1]}})

    def do_PATCH(self) -> None:
        _, _, body = self._record()
        self._send(200, {"kind": "ConfigMap", **body})

    def do_DELETE(self) -> None:
        self._record()
        self._send(200, {"kind": "Status", "status": "Success"})


class StandIn:
    """The stand-in API server on a fixed loopback port, which can restart as a real one does:
    every open connection (held watch streams too) is cut, and a new server takes the port."""

    def __init__(self) -> None:
        self.port = 0
        self._start()

    def _start(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), StandInApiServer)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for connection in list(StandInApiServer.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def restart(self) -> None:
        self.stop()
        self._start()


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    StandInApiServer.seen = []
    StandInApiServer.client_left_streams = 0
    StandInApiServer.connections = set()
    running = StandIn()
    yield running
    running.stop()


@pytest.fixture
def server(stand_in: StandIn) -> str:
    return stand_in.url


@pytest.fixture
def api(server: str, tmp_path: Path) -> KubernetesApi:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": TOKEN}}],
        "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u", "namespace": "ns"}}],
    }))
    return KubernetesApi.connect(str(kubeconfig))


def test_create_sends_the_json_it_was_given_and_returns_json(api: KubernetesApi) -> None:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"name": "grpc", "containerPort": 1}]}]}}
    created = api.create("Pod", "ns", body)
    assert created["metadata"]["uid"] == "uid-1"
    [request] = StandInApiServer.seen
    assert (request["method"], request["path"]) == ("POST", "/api/v1/namespaces/ns/pods")
    assert request["body"] == body  # exactly what was validated, no model round trip
    assert request["authorization"] == f"Bearer {TOKEN}"
    assert request["content_type"] == "application/json"


def test_discovery_lists_the_kinds_a_group_version_serves(api: KubernetesApi) -> None:
    """Whether the LeaderWorkerSet CRD is installed: GET /apis/<group>/<version>, 404 when not."""
    assert api.served_kinds("leaderworkerset.x-k8s.io/v1") == ["LeaderWorkerSet"]
    assert api.served_kinds("example.com/v1") == []
    assert [(r["method"], r["path"]) for r in StandInApiServer.seen[-2:]] == [
        ("GET", "/apis/leaderworkerset.x-k8s.io/v1"), ("GET", "/apis/example.com/v1")]


def test_cluster_sut_kinds_have_their_api_paths(api: KubernetesApi) -> None:
    for kind, path in (("StatefulSet", "/apis/apps/v1/namespaces/ns/statefulsets"),
                       ("NetworkPolicy", "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies"),
                       ("LeaderWorkerSet", "/apis/leaderworkerset.x-k8s.io/v1/namespaces/ns/leaderworkersets")):
        api.delete(kind, "ns", "x", propagation="Orphan")
        assert (StandInApiServer.seen[-1]["method"], StandInApiServer.seen[-1]["path"]) == ("DELETE", f"{path}/x")
        assert StandInApiServer.seen[-1]["body"]["propagationPolicy"] == "Orphan"


def test_errors_carry_the_status_reason_and_message(api: KubernetesApi) -> None:
    with pytest.raises(ClusterApiError) as caught:
        api.get("Pod", "ns", "missing")
    assert (caught.value.status, caught.value.reason, caught.value.message) == (
        404, "NotFound", 'pods "missing" not found'
    )


def test_list_with_selectors_and_cluster_scoped_kinds(api: KubernetesApi) -> None:
    listing = api.list("Pod", "ns", label_selector="a=b,c", field_selector="involvedObject.name=p")
    assert listing.resource_version == "7"
    assert listing.items == [{"kind": "Pod", "metadata": {"name": "p"}}]
    assert StandInApiServer.seen[-1]["query"] == {"labelSelector": ["a=b,c"], "fieldSelector": ["involvedObject.name=p"]}
    assert [n["metadata"]["name"] for n in api.list("Node", "").items] == ["node-a"]
    assert StandInApiServer.seen[-1]["path"] == "/api/v1/nodes"


def test_watch_streams_events_line_by_line(api: KubernetesApi) -> None:
    events = list(api.watch("Pod", "ns", label_selector="x=y", resource_version="7", timeout_s=1))
    assert [(e.type, e.object["metadata"]["resourceVersion"]) for e in events] == [("ADDED", "8"), ("MODIFIED", "9")]
    query = StandInApiServer.seen[-1]["query"]
    assert query["watch"] == ["true"] and query["resourceVersion"] == ["7"] and query["timeoutSeconds"] == ["1"]
    assert query["allowWatchBookmarks"] == ["true"]
    # Read to its end: the connection is reused for what follows.
    api.get("Pod", "ns", "p")


def test_a_watch_left_early_does_not_poison_the_connection_pool(api: KubernetesApi) -> None:
    """Issue 20 (1): the backend leaves every watch once it has what it waited for, while the
    API server still holds the stream open. The POST after it must not go out on that connection."""
    for _ in range(3):
        for event in api.watch("Pod", "ns", resource_version="7", timeout_s=30):
            assert event.type == "ADDED"
            break  # what the waits do: return on the awaited event
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}
        assert api.create("Pod", "ns", body)["metadata"]["uid"] == "uid-1"
    assert [r["method"] for r in StandInApiServer.seen] == ["GET", "POST"] * 3
    # The streams left early were closed by the client, not held for their 30 s.
    deadline = time.monotonic() + 5
    while StandInApiServer.client_left_streams < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert StandInApiServer.client_left_streams == 3


def test_a_log_stream_left_early_does_not_poison_the_connection_pool(api: KubernetesApi) -> None:
    stream = api.read_log("ns", "running", container="sut-agent", follow=True)
    assert next(stream).startswith(b"listening")
    stream.close()
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}
    assert api.create("Pod", "ns", body)["metadata"]["uid"] == "uid-1"


def test_an_api_server_restart_breaks_a_held_watch_and_the_pool_recovers(stand_in: StandIn,
                                                                        api: KubernetesApi) -> None:
    """Issue 20 (4): a watch held open (what the waits do for up to 900 s) when the API server
    restarts: the stream ends in ClusterApiError status 0, and the next requests, a POST among
    them, go out on fresh connections to the new server."""
    events = []
    with pytest.raises(ClusterApiError) as caught:
        for event in api.watch("Pod", "ns", resource_version="7", timeout_s=30):
            events.append(event.type)
            if len(events) == 2:
                stand_in.restart()
    assert events == ["ADDED", "MODIFIED"]
    assert caught.value.status == 0
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}
    assert api.create("Pod", "ns", body)["metadata"]["uid"] == "uid-1"
    assert api.list("Pod", "ns").resource_version == "7"


def test_a_watch_cut_mid_way_is_status_0_not_a_protocol_error(api: KubernetesApi) -> None:
    """Issue 20 (4): the stream breaks (API server restart): ClusterApiError, which the waits
    answer by listing and watching again, never urllib3's ProtocolError escaping them."""
    events = []
    with pytest.raises(ClusterApiError) as caught:
        for event in api.watch("Pod", "ns", resource_version="cut", timeout_s=30):
            events.append(event.type)
    assert events == ["ADDED", "MODIFIED"]
    assert caught.value.status == 0 and caught.value.reason == "StreamBroken"
    # The pool is still good.
    assert api.get("Pod", "ns", "p")["metadata"]["name"] == "p"


def test_watch_from_a_compacted_version_is_410(api: KubernetesApi) -> None:
    with pytest.raises(ClusterApiError) as caught:
        list(api.watch("Pod", "ns", resource_version="1", timeout_s=5))
    assert caught.value.status == 410 and caught.value.reason == "Expired"


def test_patch_is_a_merge_patch_and_delete_propagates_in_the_background(api: KubernetesApi) -> None:
    api.patch("ConfigMap", "ns", "owner", {"metadata": {"annotations": {"a": "b"}}})
    assert StandInApiServer.seen[-1]["content_type"] == "application/merge-patch+json"
    assert StandInApiServer.seen[-1]["path"] == "/api/v1/namespaces/ns/configmaps/owner"
    api.delete("Job", "ns", "j")
    request = StandInApiServer.seen[-1]
    assert (request["method"], request["path"]) == ("DELETE", "/apis/batch/v1/namespaces/ns/jobs/j")
    assert request["body"]["propagationPolicy"] == "Background"


def test_logs_are_followed(api: KubernetesApi) -> None:
    data = b"".join(api.read_log("ns", "p", container="sut-agent", follow=True))
    assert data == b'listening on 0.0.0.0:50051\n{"event": "server_listening"}\n'
    assert StandInApiServer.seen[-1]["query"] == {"container": ["sut-agent"], "follow": ["true"]}


def test_an_unreachable_server_is_status_0() -> None:
    from kubernetes import client

    configuration = client.Configuration(host="http://127.0.0.1:1")
    configuration.retries = 0
    unreachable = KubernetesApi(client.ApiClient(configuration), request_timeout_s=2)
    with pytest.raises(ClusterApiError) as caught:
        unreachable.get("Pod", "ns", "p")
    assert caught.value.status == 0


def test_a_missing_kubeconfig_is_a_failed_precondition(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="kubeconfig"):
        KubernetesApi.connect(str(tmp_path / "nope"))


def test_open_backend_selects_kubernetes(tmp_path: Path) -> None:
    from controller.app import open_backend
    from controller.settings import ControllerSettings

    settings = ControllerSettings(data_dir=tmp_path, backend="kubernetes", k8s_kubeconfig=str(tmp_path / "nope"))
    with pytest.raises(FailedPrecondition, match="cannot configure the Kubernetes client"):
        open_backend(settings)


@real_only
def test_the_real_cluster_answers(tmp_path: Path) -> None:
    import os

    from tests.kubernetes.conftest import KUBECONFIG_ENV

    real = KubernetesApi.connect(os.environ[KUBECONFIG_ENV])
    assert real.list("Node", "").items
