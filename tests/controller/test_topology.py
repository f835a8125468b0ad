"""The netns topology: real namespaces and veth pairs, real TCP across them."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
from pyroute2 import netns

from controller.backends.topology import NetnsTopology
from mecbench.core.errors import InvalidArgument
from tests.conftest import requires_root


def _in_netns(name: str, code: str) -> subprocess.CompletedProcess[str]:
    script = f"from mecbench.core.netns import enter_netns\nenter_netns({name!r})\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)


@requires_root
def test_clients_reach_the_edge_over_their_data_links_and_the_host_over_management() -> None:
    topology = NetnsTopology("tpt", slot=41, clients=2)
    topology.create()
    try:
        server = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                from mecbench.core.netns import enter_netns
                enter_netns({topology.edge.netns!r})
                import socket
                s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", 7070)); s.listen(); print("ready", flush=True)
                for _ in range(3):
                    c, peer = s.accept(); c.sendall(peer[0].encode()); c.close()
            """)],
            stdout=subprocess.PIPE, text=True,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        # The controller (host namespace) dials the management address.
        with socket.create_connection((topology.edge.management_ip, 7070), timeout=5) as conn:
            assert conn.recv(64).decode() == "10.232.41.1"
        # Each client dials the edge over its own data link and is seen from its data address.
        for client, node in enumerate(topology.client_nodes):
            result = _in_netns(node.netns, f"""
                import socket
                with socket.create_connection(({topology.edge_data_ip(client)!r}, 7070), timeout=5) as c:
                    print(c.recv(64).decode())
            """)
            assert result.stdout.strip() == node.data_ip, result.stderr
        server.wait(10)
    finally:
        topology.destroy()
    assert not {topology.edge.netns, *(n.netns for n in topology.client_nodes)} & set(netns.listnetns())
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert "mbtpt" not in links


def test_bad_topology_parameters_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        NetnsTopology("bad name!", slot=1, clients=1)
    with pytest.raises(InvalidArgument):
        NetnsTopology("ok", slot=64, clients=1)
    with pytest.raises(InvalidArgument):
        NetnsTopology("ok", slot=1, clients=0)
