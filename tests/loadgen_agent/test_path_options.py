"""A DataPlaneOptions field that only the other data-plane path applies is refused when a session
opens (INVALID_ARGUMENT naming each such field, no process left), not accepted and ignored: the
pure check, then real sessions against the real SUT agent, relaying to its synthetic backend and
talking directly to an external server (MECBench's model server, OpenAI face) it started."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.core.path_options import DIRECT_ONLY_FIELDS, RELAY_ONLY_FIELDS, path_option_violations, relayed
from mecbench.v1 import common_pb2, loadgen_agent_pb2, sut_agent_pb2, sut_agent_pb2_grpc
from model_server.models import build_bigram_lm
from sut_agent.server import create_server as create_sut_server
from sut_agent.settings import SutAgentSettings
from tests.conftest import field_violations
from tests.external_servers import CORPUS, LM_NAME, MODEL_SERVER, ROOT, prompts_tar
from tests.loadgen_agent.conftest import Agent, SutServer, start_agent, worker_processes

Options = loadgen_agent_pb2.DataPlaneOptions

# One value that asks for something, for every field of one path only.
RELAY_FIELDS: dict[str, object] = {
    "max_batch_size": 8,
    "max_batch_delay": durations.from_seconds(0.001),
    "streams": 2,
    "omit_payloads": True,
    "min_frame_interval": durations.from_seconds(0.001),
}
DIRECT_FIELDS: dict[str, object] = {
    "max_in_flight": 4,
    "ramp": loadgen_agent_pb2.LoadRamp(
        stages=[loadgen_agent_pb2.LoadStage(rate=10, duration=durations.from_seconds(1))]
    ),
}
# Both paths apply these.
SHARED_FIELDS: dict[str, object] = {
    "sut_interface": loadgen_agent_pb2.SUT_INTERFACE_STANDARD,
    "response_timeout": durations.from_seconds(5),
    "transport": loadgen_agent_pb2.DATA_PLANE_TRANSPORT_TCP,
}


def test_the_field_lists_cover_every_path_specific_field() -> None:
    assert set(RELAY_ONLY_FIELDS) == set(RELAY_FIELDS)
    assert set(DIRECT_ONLY_FIELDS) == set(DIRECT_FIELDS)


def test_each_field_of_the_other_path_is_named() -> None:
    everything = Options(**RELAY_FIELDS, **DIRECT_FIELDS, **SHARED_FIELDS)  # type: ignore[arg-type]
    relayed = path_option_violations(everything, direct=False)
    assert [v.field for v in relayed] == ["data_plane.max_in_flight", "data_plane.ramp"]
    assert all("direct client path only" in v.description and "relays" in v.description for v in relayed)
    direct = path_option_violations(everything, direct=True, prefix="spec.data_plane")
    assert [v.field for v in direct] == [f"spec.data_plane.{name}" for name in RELAY_FIELDS]
    assert all("relay path only" in v.description and "directly" in v.description for v in direct)


@pytest.mark.parametrize("name", [*RELAY_FIELDS, *DIRECT_FIELDS])
def test_one_field_alone_is_refused_on_the_other_path_only(name: str) -> None:
    options = Options(**{name: (RELAY_FIELDS | DIRECT_FIELDS)[name]})  # type: ignore[arg-type]
    relay_field = name in RELAY_FIELDS
    assert [v.field for v in path_option_violations(options, direct=relay_field)] == [f"data_plane.{name}"]
    assert path_option_violations(options, direct=not relay_field) == []


def test_defaults_and_shared_fields_are_never_refused() -> None:
    zero = Options(max_batch_delay=durations.from_seconds(0), min_frame_interval=durations.from_seconds(0))
    shared = Options(**SHARED_FIELDS)  # type: ignore[arg-type]
    for options in (Options(), zero, shared):
        assert path_option_violations(options, direct=True) == []
        assert path_option_violations(options, direct=False) == []
    # A ramp set, even with no stage, is the direct client's: the relay refuses it.
    assert [v.field for v in path_option_violations(Options(ramp=loadgen_agent_pb2.LoadRamp()), direct=False)] == [
        "data_plane.ramp"
    ]


def test_relayed_keeps_what_a_relay_applies_and_drops_the_direct_clients_fields() -> None:
    """What an experiment's harness calibration (a synthetic SUT: its sessions relay) opens with."""
    everything = Options(**RELAY_FIELDS, **DIRECT_FIELDS, **SHARED_FIELDS)  # type: ignore[arg-type]
    relay = relayed(everything)
    assert path_option_violations(relay, direct=False) == []
    assert relay == Options(**RELAY_FIELDS, **SHARED_FIELDS)  # type: ignore[arg-type]
    direct = relayed(Options(transport=loadgen_agent_pb2.DATA_PLANE_TRANSPORT_DIRECT, max_in_flight=4))
    assert direct == Options()


def refused_open(agent: Agent, sut_address: str, **fields: object) -> dict[str, str]:
    """Open a session that must be refused; the refusal's field violations. Nothing is left."""
    before = set(worker_processes())
    with pytest.raises(grpc.RpcError) as refused:
        agent.open(sut_address, **fields)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert set(worker_processes()) == before
    assert not agent.stub.ListSessions(loadgen_agent_pb2.ListSessionsRequest()).sessions
    return field_violations(refused.value)


def test_a_relay_session_refuses_the_direct_clients_fields(agent: Agent, sut: SutServer) -> None:
    """The synthetic backend serves no external server: the session relays, and refuses
    max_in_flight and ramp (and opens with the relay's own fields)."""
    violations = refused_open(agent, sut.address, data_plane=Options(**DIRECT_FIELDS))  # type: ignore[arg-type]
    assert violations.keys() == {"data_plane.max_in_flight", "data_plane.ramp"}
    assert "relays samples through the SUT agent" in violations["data_plane.max_in_flight"]
    opened = agent.open(sut.address, data_plane=Options(**RELAY_FIELDS))  # type: ignore[arg-type]
    agent.close(opened.session_id)


PROFILE = "model-server-openai"


@pytest.fixture(scope="module")
def external_sut(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real SUT agent running MECBench's model server (OpenAI face, a tiny language model),
    whose type has a client half: sessions of the default transport talk to it directly."""
    root = tmp_path_factory.mktemp("external-sut")
    (root / "models").mkdir()
    build_bigram_lm(CORPUS, root / "models" / f"{LM_NAME}.lm.onnx")
    profiles = root / "servers.yaml"
    profiles.write_text(
        "profiles:\n"
        + MODEL_SERVER.format(name=PROFILE, server_type="openai", endpoint="http://{host}:{port}", extra="", root=ROOT)
    )
    (root / "logs").mkdir()
    settings = SutAgentSettings(server_profiles=profiles, model_dir=root / "models", server_log_dir=root / "logs")
    running, port = create_sut_server("127.0.0.1:0", settings)
    address = f"127.0.0.1:{port}"
    channel = open_channel(address)
    stub = sut_agent_pb2_grpc.SutAgentStub(channel)
    try:
        config = sut_agent_pb2.ExternalBackendConfig(profile=PROFILE, model=LM_NAME)
        config.options.update({"max_tokens": "4"})
        stub.Start(sut_agent_pb2.StartRequest(config=sut_agent_pb2.SutConfig(external=config)), timeout=60)
        yield address
    finally:
        stub.Stop(sut_agent_pb2.StopRequest(), timeout=30)
        channel.close()
        running.stop(0.5)


def test_a_direct_session_refuses_the_relays_fields(tmp_path: Path, external_sut: str) -> None:
    """The default transport talks to the OpenAI server directly: the relay's batching, streams,
    payload and pacing fields are refused, each named; the direct client's own open the session.
    Asking for the relay (TCP) turns it round: max_in_flight is refused, max_batch_size opens."""
    agent = start_agent(tmp_path)
    dataset = common_pb2.DatasetSpec(uri=str(prompts_tar(tmp_path / "prompts.tar")))
    try:
        violations = refused_open(agent, external_sut, dataset=dataset, data_plane=Options(**RELAY_FIELDS))  # type: ignore[arg-type]
        assert violations.keys() == {f"data_plane.{name}" for name in RELAY_FIELDS}
        assert "talks to the SUT's external server directly" in violations["data_plane.min_frame_interval"]
        direct = agent.open(external_sut, dataset=dataset, data_plane=Options(max_in_flight=2))
        agent.close(direct.session_id)

        tcp = loadgen_agent_pb2.DATA_PLANE_TRANSPORT_TCP
        relayed = refused_open(agent, external_sut, dataset=dataset, data_plane=Options(transport=tcp, max_in_flight=2))
        assert relayed.keys() == {"data_plane.max_in_flight"}
        relay = agent.open(external_sut, dataset=dataset, data_plane=Options(transport=tcp, max_batch_size=8))
        agent.close(relay.session_id)
    finally:
        agent.channel.close()
        agent.server.stop(1.0)
